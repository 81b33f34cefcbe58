"""Offline five-crop preparation of the training set (spec §7) and its manifest.

:func:`prepare_five_crops` cuts every training image once into five crops — the four corners
and the centre — of half its height and half its width; each crop is resized
(nearest-neighbour) so its shorter side is ``crop_size`` and centre-cropped to
``crop_size × crop_size``. Output::

    out_dir/
        images/{key}_{k}.png      k = 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right, 4 centre
        labels/{key}_{k}.png      only when the dataset has labels; uint8 class ids, 255 = ignore
        manifest.json             written last: its presence means "complete"

Every file is written atomically (temporary file + ``os.replace``), so an interrupted run
never leaves a half-written PNG behind a final name. The step is idempotent and resumable:
crops that already exist are not rewritten, and rerunning on a complete directory only
compares the manifest with the dataset's keys (no image is read).

The crop boxes follow torchvision's ``five_crop``: the centre crop starts at
``int(round((H - h) / 2))``; with ``h = H // 2`` an odd height loses its last row in the
corner crops.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hpseg.files import atomic_write, remove_stale_temporaries, write_json_atomic
from hpseg.logs import progress_bar

from .datasets import RawDataset
from .errors import DatasetLayoutError, ImageReadError
from .transforms import center_crop, resize_shorter_side

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "five_crop_boxes",
    "five_crops",
    "load_manifest",
    "prepare_five_crops",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IGNORE_U8 = 255  # ignore value of the uint8 label PNGs (−1 in memory)
N_CROPS = 5

_log = logging.getLogger(__name__)


def five_crop_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """PIL boxes (left, top, right, bottom) of the five half-size crops of an H×W image.

    Order: top-left, top-right, bottom-left, bottom-right, centre. Each box is
    ``(W // 2) × (H // 2)``.
    """
    h, w = height // 2, width // 2
    if h < 1 or w < 1:
        raise ValueError(f"image of {width}x{height} pixels is too small for five half-size crops")
    top_c, left_c = round((height - h) / 2.0), round((width - w) / 2.0)
    return [
        (0, 0, w, h),
        (width - w, 0, width, h),
        (0, height - h, w, height),
        (width - w, height - h, width, height),
        (left_c, top_c, left_c + w, top_c + h),
    ]


def five_crops(
    image: Image.Image, label: np.ndarray | None, crop_size: int
) -> list[tuple[Image.Image, Image.Image | None]]:
    """The five training crops of one image.

    image: RGB PIL (H, W); label: (H, W) int64 (−1 = ignore) or None.
    Returns five (RGB PIL (crop_size, crop_size), uint8 'L' PIL label with 255 = ignore, or None).
    """
    lab_img = None
    if label is not None:
        if label.shape != (image.height, image.width):
            raise ValueError(f"label shape {label.shape} differs from image {(image.height, image.width)}")
        if label.max(initial=-1) >= IGNORE_U8:
            raise ValueError(f"class id {int(label.max())} does not fit the uint8 label format")
        lab_img = Image.fromarray(np.where(label < 0, IGNORE_U8, label).astype(np.uint8), "L")
    out = []
    for box in five_crop_boxes(image.height, image.width):
        # Nearest for the image too: the reference prepares its crops that way (spec §7).
        ci = center_crop(resize_shorter_side(image.crop(box), crop_size, Image.Resampling.NEAREST), crop_size)
        cl = None
        if lab_img is not None:
            cl = center_crop(
                resize_shorter_side(lab_img.crop(box), crop_size, Image.Resampling.NEAREST), crop_size
            )
        out.append((ci, cl))
    return out


def _save_png(img: Image.Image, path: Path) -> None:
    with atomic_write(path) as handle:
        # compress_level 1: ~3x faster than the default for a few percent more disk.
        img.save(handle, format="PNG", compress_level=1)


def load_manifest(prepared_dir: str | Path, *, check_files: bool = True) -> dict[str, Any]:
    """Read and validate ``prepared_dir/manifest.json``.

    Raises DatasetLayoutError (telling to run ``hpseg prepare``) when the directory or the
    manifest is missing, unreadable, of another format version, or — with ``check_files`` —
    when a crop it lists is missing.
    """
    d = Path(prepared_dir)
    hint = "run `hpseg prepare` (hpseg.data.prepare_five_crops) to create it"
    path = d / MANIFEST_NAME
    if not path.is_file():
        what = (
            "missing prepared crop directory" if not d.is_dir() else "missing or incomplete crop preparation"
        )
        raise DatasetLayoutError(f"{what}: {path} not found; {hint}", path)
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetLayoutError(f"unreadable manifest {path} ({e}); {hint}", path) from e
    required = (
        "format_version",
        "dataset",
        "split",
        "crop_size",
        "n_classes",
        "class_names",
        "has_labels",
        "crops",
    )
    missing = [k for k in required if k not in m]
    if missing:
        raise DatasetLayoutError(f"manifest {path} lacks {', '.join(missing)}; {hint}", path)
    if m["format_version"] != FORMAT_VERSION:
        raise DatasetLayoutError(
            f"manifest {path} has format version {m['format_version']}, this hpseg reads "
            f"{FORMAT_VERSION}; delete {d} and {hint}",
            path,
        )
    if check_files:
        subdirs = ["images"] + (["labels"] if m["has_labels"] else [])
        for sub in subdirs:
            names = set(os.listdir(d / sub)) if (d / sub).is_dir() else set()
            for stem in m["crops"]:
                if stem + ".png" not in names:
                    raise DatasetLayoutError(
                        f"incomplete crop preparation: {d / sub / (stem + '.png')} is missing; {hint} "
                        "again (it resumes)",
                        d / sub / (stem + ".png"),
                    )
    return m


def _check_compatible(m: dict[str, Any], raw: RawDataset, crop_size: int, out_dir: Path) -> None:
    wanted = {
        "format_version": FORMAT_VERSION,
        "dataset": raw.name,
        "split": raw.split,
        "crop_size": crop_size,
        "has_labels": raw.has_labels,
    }
    diff = [f"{k}: {m.get(k)!r} there, {v!r} requested" for k, v in wanted.items() if m.get(k) != v]
    if diff:
        raise DatasetLayoutError(
            f"{out_dir} already holds crops prepared differently ({'; '.join(diff)}); "
            "choose another output directory or delete this one",
            out_dir / MANIFEST_NAME,
        )


@dataclass
class _Outputs:
    """The crop folders of one preparation and the file names already in them."""

    images: Path
    labels: Path | None
    have_images: set[str]
    have_labels: set[str]

    @classmethod
    def open(cls, out_dir: Path, has_labels: bool) -> _Outputs:
        images, labels = out_dir / "images", (out_dir / "labels" if has_labels else None)
        for folder in (images, labels):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        return cls(images, labels, set(os.listdir(images)), set(os.listdir(labels)) if labels else set())

    def has(self, name: str) -> bool:
        return name in self.have_images and (self.labels is None or name in self.have_labels)


def _previous_manifest(out_dir: Path, raw: RawDataset, crop_size: int) -> dict[str, Any] | None:
    """The manifest of an earlier run into ``out_dir``, checked to be compatible (None if absent or damaged)."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged manifest is rewritten
    _check_compatible(manifest, raw, crop_size, out_dir)
    return manifest


def _is_complete(manifest: dict[str, Any], raw: RawDataset, outputs: _Outputs) -> bool:
    """Whether ``manifest`` records a complete preparation of exactly ``raw``'s images."""
    skipped = set(manifest.get("skipped_keys", []))
    expected = [f"{raw.key_of(i)}_{k}" for i in range(len(raw)) if raw.key_of(i) not in skipped for k in range(N_CROPS)]
    return (manifest.get("n_source_images") == len(raw) and manifest.get("crops") == expected
            and all(outputs.has(stem + ".png") for stem in expected))


def _check_existing_crop_size(outputs: _Outputs, crop_size: int, out_dir: Path) -> None:
    """Crops of an interrupted run must have ``crop_size``: resuming must not mix two sizes."""
    first = next((n for n in sorted(outputs.have_images) if n.endswith(".png") and not n.startswith(".")), None)
    if first is None:
        return
    try:
        with Image.open(outputs.images / first) as probe:
            size = probe.size
    except OSError:
        return  # unreadable: not evidence of another size
    if size != (crop_size, crop_size):
        raise DatasetLayoutError(
            f"{outputs.images / first} is {size[0]}x{size[1]}, not {crop_size}x{crop_size}: "
            f"{out_dir} holds crops of another size; choose another output directory or delete it",
            outputs.images / first,
        )


def _check_croppable(image: Image.Image, path: Path) -> None:
    """An image too small for five half-size crops is a bad image of the dataset, named as such."""
    width, height = image.size
    if width < 2 or height < 2:
        raise ImageReadError(f"{path}: image of {width}x{height} pixels is too small for five half-size "
                             "crops (at least 2x2); remove it or set data.skip_bad_images=true", path)


def _crop_image(raw: RawDataset, i: int, outputs: _Outputs, crop_size: int) -> ImageReadError | None:
    """Write the missing crops of item ``i``; returns the read error of a skipped image."""
    names = [f"{raw.key_of(i)}_{k}.png" for k in range(N_CROPS)]
    if all(outputs.has(name) for name in names):
        return None
    try:
        sample = raw.read(i)
        _check_croppable(sample.image, raw.path_of(i))
    except ImageReadError as error:
        if not raw.skip_bad_images:
            if "skip_bad_images" in str(error):
                raise
            raise ImageReadError(f"{error}; to skip unreadable images instead, add data.skip_bad_images=true",
                                 error.path) from error
        return error
    for name, (image, label) in zip(names, five_crops(sample.image, sample.label, crop_size)):
        if name not in outputs.have_images:
            _save_png(image, outputs.images / name)
        if label is not None and outputs.labels is not None and name not in outputs.have_labels:
            _save_png(label, outputs.labels / name)
    return None


def _crop_all(raw: RawDataset, outputs: _Outputs, crop_size: int, num_workers: int) -> Iterator[ImageReadError | None]:
    """``_crop_image`` of every item in order, in ``num_workers`` threads (0: this thread)."""
    items = range(len(raw))
    if num_workers <= 0:
        yield from (_crop_image(raw, i, outputs, crop_size) for i in items)
        return
    # Pillow releases the GIL while decoding, resizing and encoding, so threads scale.
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        try:
            yield from pool.map(lambda i: _crop_image(raw, i, outputs, crop_size), items)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def prepare_five_crops(raw: RawDataset, out_dir: str | Path, crop_size: int = 224, *, num_workers: int = 0) -> Path:
    """Write the five-crop training set of ``raw`` to ``out_dir`` and return ``out_dir``.

    ``num_workers`` > 0 decodes/encodes in that many threads. Unreadable images raise
    ImageReadError, or are skipped (recorded under ``"skipped"`` in the manifest) when
    ``raw.skip_bad_images`` is set; a complete rerun does not retry them — delete
    ``manifest.json`` to do so. Progress is shown when the ``hpseg`` logger shows INFO.
    """
    if crop_size < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    out_dir = Path(out_dir)
    previous = _previous_manifest(out_dir, raw, crop_size)
    outputs = _Outputs.open(out_dir, raw.has_labels)
    if previous is not None:
        if _is_complete(previous, raw, outputs):
            return out_dir  # nothing to read or write
        # An incomplete or outdated run: drop its manifest so nobody trains on it while we resume.
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    _check_existing_crop_size(outputs, crop_size, out_dir)
    for folder in (outputs.images, outputs.labels):
        if folder is not None:
            remove_stale_temporaries(folder)

    crops: list[str] = []
    skipped_paths: list[str] = []
    skipped_keys: list[str] = []
    results = _crop_all(raw, outputs, crop_size, num_workers)
    bar = progress_bar(results, _log, total=len(raw), desc=f"five-crop {raw.name}/{raw.split}", unit="img")
    for i, error in enumerate(bar):
        key = raw.key_of(i)
        if error is None:
            crops.extend(f"{key}_{k}" for k in range(N_CROPS))
        else:
            raw.note_skipped(raw.path_of(i), error)
            skipped_paths.append(str(raw.path_of(i)))
            skipped_keys.append(key)
    write_json_atomic(_manifest(raw, crop_size, crops, skipped_paths, skipped_keys), out_dir / MANIFEST_NAME, indent=1)
    return out_dir


def _manifest(raw: RawDataset, crop_size: int, crops: list[str], skipped_paths: list[str],
              skipped_keys: list[str]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": raw.name,
        "split": raw.split,
        "source_root": str(Path(raw.root).resolve()),
        "crop_size": crop_size,
        "n_source_images": len(raw),
        "n_classes": raw.n_classes,
        "class_names": raw.class_names,
        "has_labels": raw.has_labels,
        "skipped": skipped_paths,
        "skipped_keys": skipped_keys,
        "crops": crops,
    }
