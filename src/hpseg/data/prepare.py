"""Offline preparation of the training set (spec §7) and its manifest.

:func:`prepare_training_set` writes the training items of a raw dataset by one of two crop
rules, and records in the manifest how they were made (``crop_rule``, ``crop_format``,
``stored_size``), so that training, a feature cache and a resumed run can check it:

``five`` (COCO-Stuff, Cityscapes, folders)
    every image is cut once into five crops — the four corners and the centre — of half its
    height and half its width. **[ref quirk]** ``crop_format="jpeg"`` (default): the crops are
    stored at their own size as JPEG with Pillow's defaults (quality 75, 4:2:0), as the authors'
    crop step wrote them, so every training image carries that JPEG loss; the training reader
    resizes them (nearest, shorter side to ``crop_size``) and centre-crops them.
    ``crop_format="png"``: lossless, resized and centre-cropped here already (stored at
    ``crop_size``).
``whole`` (Potsdam-3, **[ref quirk]**)
    one item per image: the whole image resized (nearest, shorter side to ``crop_size``) and
    centre-cropped, i.e. the validation view at ``crop_size``, stored as PNG. The authors' Potsdam
    training set reads the ``.mat`` tiles directly this way (no five-crop, no JPEG).

Output::

    out_dir/
        images/{key}_{k}.jpg|png  five: k = 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right, 4 centre
        images/{key}.png          whole
        labels/...png             only when the dataset has labels; uint8 class ids, 255 = ignore
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
from typing import Any, Literal

import numpy as np
from PIL import Image

from hpseg.errors import InvalidInputError
from hpseg.files import atomic_write, remove_stale_temporaries, write_json_atomic
from hpseg.logs import progress_bar

from .datasets import RawDataset
from .errors import DatasetLayoutError, ImageReadError
from .transforms import center_crop, resize_shorter_side, val_view

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CropFormat",
    "CropRule",
    "five_crop_boxes",
    "five_crops",
    "item_stems",
    "load_manifest",
    "prepare_five_crops",
    "prepare_training_set",
    "recipe_mismatches",
    "training_recipe",
]

#: 2: the manifest records the crop rule, the image format and the stored size (version 1 sets
#: are read as what they were: five PNG crops stored at ``crop_size``).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
IGNORE_U8 = 255  # ignore value of the uint8 label PNGs (−1 in memory)
N_CROPS = 5

CropRule = Literal["five", "whole"]
CropFormat = Literal["jpeg", "png"]
SUFFIX = {"jpeg": ".jpg", "png": ".png"}

_log = logging.getLogger(__name__)


def five_crop_boxes(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """PIL boxes (left, top, right, bottom) of the five half-size crops of an H×W image.

    Order: top-left, top-right, bottom-left, bottom-right, centre. Each box is
    ``(W // 2) × (H // 2)``.
    """
    h, w = height // 2, width // 2
    if h < 1 or w < 1:
        raise InvalidInputError(f"image of {width}x{height} pixels is too small for five half-size crops")
    top_c, left_c = round((height - h) / 2.0), round((width - w) / 2.0)
    return [
        (0, 0, w, h),
        (width - w, 0, width, h),
        (0, height - h, w, height),
        (width - w, height - h, width, height),
        (left_c, top_c, left_c + w, top_c + h),
    ]


def _label_image(label: np.ndarray, image: Image.Image) -> Image.Image:
    """(H, W) int64 class ids (−1 = ignore) -> uint8 'L' PIL image with 255 = ignore."""
    if label.shape != (image.height, image.width):
        raise InvalidInputError(f"label shape {label.shape} differs from image {(image.height, image.width)}")
    if label.max(initial=-1) >= IGNORE_U8:
        raise InvalidInputError(f"class id {int(label.max())} does not fit the uint8 label format")
    return Image.fromarray(np.where(label < 0, IGNORE_U8, label).astype(np.uint8), "L")


def five_crops(
    image: Image.Image, label: np.ndarray | None, crop_size: int | None
) -> list[tuple[Image.Image, Image.Image | None]]:
    """The five training crops of one image.

    image: RGB PIL (H, W); label: (H, W) int64 (−1 = ignore) or None. ``crop_size``: each crop
    resized (nearest) so its shorter side is ``crop_size`` and centre-cropped to it; None keeps
    the crops at their own size ((W // 2) × (H // 2)), as the authors store them.
    Returns five (RGB PIL, uint8 'L' PIL label with 255 = ignore, or None).
    """
    lab_img = None if label is None else _label_image(label, image)

    def sized(img: Image.Image) -> Image.Image:
        # Nearest for the image too: the reference's training view does that (spec §7).
        return img if crop_size is None else center_crop(
            resize_shorter_side(img, crop_size, Image.Resampling.NEAREST), crop_size)

    return [(sized(image.crop(box)), None if lab_img is None else sized(lab_img.crop(box)))
            for box in five_crop_boxes(image.height, image.width)]


def whole_view(image: Image.Image, label: np.ndarray | None, crop_size: int) -> tuple[Image.Image, Image.Image | None]:
    """The ``whole`` rule's item: the validation view of the whole image at ``crop_size``
    (RGB PIL, uint8 'L' PIL label with 255 = ignore, or None)."""
    img, lab = val_view(image, label, crop_size, "nearest")
    return img, None if lab is None else _label_image(lab, img)


def item_stems(key: str, crop_rule: CropRule) -> list[str]:
    """The names of the training items that one source image (``key``) gives under ``crop_rule``."""
    return [key] if crop_rule == "whole" else [f"{key}_{k}" for k in range(N_CROPS)]


def training_recipe(crop_rule: CropRule, crop_format: CropFormat, crop_size: int) -> dict[str, Any]:
    """How a prepared set's items are made, as its manifest records it: the crop rule, the image
    format actually written and the stored size ("source": each crop at its own size, resized
    when read; an int: already ``crop_size``). The ``whole`` rule always writes PNG."""
    if crop_rule not in ("five", "whole"):
        raise ValueError(f"crop rule must be 'five' or 'whole', got {crop_rule!r}")
    if crop_format not in SUFFIX:
        raise ValueError(f"crop format must be 'jpeg' or 'png', got {crop_format!r}")
    image_format = "png" if crop_rule == "whole" else crop_format
    stored: int | str = "source" if image_format == "jpeg" else crop_size
    return {"crop_rule": crop_rule, "crop_format": image_format, "stored_size": stored, "crop_size": crop_size}


_RECIPE_KEYS = ("crop_rule", "crop_format", "stored_size", "crop_size")


def recipe_mismatches(manifest: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """One line per field of :func:`training_recipe` that differs between a manifest and ``wanted``."""
    return [f"{key}: {manifest.get(key)!r} there, {wanted[key]!r} wanted" for key in _RECIPE_KEYS
            if manifest.get(key) != wanted[key]]


def _save(img: Image.Image, path: Path, image_format: str) -> None:
    with atomic_write(path) as handle:
        if image_format == "jpeg":
            img.save(handle, format="JPEG")  # Pillow's defaults (quality 75, 4:2:0), as the authors
        else:
            # compress_level 1: ~3x faster than the default for a few percent more disk.
            img.save(handle, format="PNG", compress_level=1)


def image_suffix(manifest: dict[str, Any]) -> str:
    """The file ending of a prepared set's images."""
    return SUFFIX[manifest["crop_format"]]


def _with_recipe(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest with its recipe: version 1 sets were all five PNG crops stored at ``crop_size``."""
    if manifest.get("format_version") != 1:
        return manifest
    return {**manifest, **training_recipe("five", "png", int(manifest.get("crop_size", 0)))}


def load_manifest(prepared_dir: str | Path, *, check_files: bool = True) -> dict[str, Any]:
    """Read and validate ``prepared_dir/manifest.json`` (a version 1 manifest gets the recipe
    of its time: five PNG crops stored at ``crop_size``).

    Raises DatasetLayoutError (telling to run ``hpseg prepare``) when the directory or the
    manifest is missing, unreadable, of another format version, or — with ``check_files`` —
    when an item it lists is missing.
    """
    d = Path(prepared_dir)
    hint = "run `hpseg prepare` (hpseg.data.prepare_training_set) to create it"
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
    m = _with_recipe(m)
    required = ("format_version", "dataset", "split", *_RECIPE_KEYS, "n_classes", "class_names", "has_labels", "crops")
    missing = [k for k in required if k not in m]
    if missing:
        raise DatasetLayoutError(f"manifest {path} lacks {', '.join(missing)}; {hint}", path)
    if m["format_version"] not in READABLE_VERSIONS:
        raise DatasetLayoutError(
            f"manifest {path} has format version {m['format_version']}, this hpseg reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; delete {d} and {hint}",
            path,
        )
    if check_files:
        subdirs = [("images", image_suffix(m))] + ([("labels", ".png")] if m["has_labels"] else [])
        for sub, suffix in subdirs:
            names = set(os.listdir(d / sub)) if (d / sub).is_dir() else set()
            for stem in m["crops"]:
                if stem + suffix not in names:
                    raise DatasetLayoutError(
                        f"incomplete crop preparation: {d / sub / (stem + suffix)} is missing; {hint} "
                        "again (it resumes)",
                        d / sub / (stem + suffix),
                    )
    return m


def _check_compatible(m: dict[str, Any], raw: RawDataset, recipe: dict[str, Any], out_dir: Path) -> None:
    wanted = {"dataset": raw.name, "split": raw.split, "has_labels": raw.has_labels, **recipe}
    m = _with_recipe(m)
    if m.get("format_version") not in READABLE_VERSIONS:
        wanted["format_version"] = FORMAT_VERSION
    diff = [f"{k}: {m.get(k)!r} there, {v!r} requested" for k, v in wanted.items() if m.get(k) != v]
    if diff:
        raise DatasetLayoutError(
            f"{out_dir} already holds crops prepared differently ({'; '.join(diff)}); "
            "choose another output directory or delete this one",
            out_dir / MANIFEST_NAME,
        )


@dataclass
class _Outputs:
    """The item folders of one preparation, how it writes, and the file names already there."""

    images: Path
    labels: Path | None
    recipe: dict[str, Any]
    have_images: set[str]
    have_labels: set[str]

    @classmethod
    def open(cls, out_dir: Path, has_labels: bool, recipe: dict[str, Any]) -> _Outputs:
        images, labels = out_dir / "images", (out_dir / "labels" if has_labels else None)
        for folder in (images, labels):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        return cls(images, labels, recipe, set(os.listdir(images)), set(os.listdir(labels)) if labels else set())

    @property
    def suffix(self) -> str:
        return SUFFIX[self.recipe["crop_format"]]

    def stems(self, key: str) -> list[str]:
        return item_stems(key, self.recipe["crop_rule"])

    def has(self, stem: str) -> bool:
        return stem + self.suffix in self.have_images and (self.labels is None or stem + ".png" in self.have_labels)


def _previous_manifest(out_dir: Path, raw: RawDataset, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier run into ``out_dir``, checked to be compatible (None if absent or damaged)."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged manifest is rewritten
    _check_compatible(manifest, raw, recipe, out_dir)
    return manifest


def _is_complete(manifest: dict[str, Any], raw: RawDataset, outputs: _Outputs) -> bool:
    """Whether ``manifest`` records a complete preparation of exactly ``raw``'s images."""
    skipped = set(manifest.get("skipped_keys", []))
    expected = [stem for i in range(len(raw)) if raw.key_of(i) not in skipped for stem in outputs.stems(raw.key_of(i))]
    return (manifest.get("n_source_images") == len(raw) and manifest.get("crops") == expected
            and all(outputs.has(stem) for stem in expected))


def _check_existing_crop_size(outputs: _Outputs, out_dir: Path) -> None:
    """Items of an interrupted run must have the stored size: resuming must not mix two sizes."""
    size = outputs.recipe["stored_size"]
    if size == "source":
        return  # crops at their own size do not depend on crop_size
    first = next((n for n in sorted(outputs.have_images) if n.endswith(outputs.suffix) and not n.startswith(".")), None)
    if first is None:
        return
    try:
        with Image.open(outputs.images / first) as probe:
            found = probe.size
    except OSError:
        return  # unreadable: not evidence of another size
    if found != (size, size):
        raise DatasetLayoutError(
            f"{outputs.images / first} is {found[0]}x{found[1]}, not {size}x{size}: "
            f"{out_dir} holds crops of another size; choose another output directory or delete it",
            outputs.images / first,
        )


def _check_croppable(image: Image.Image, path: Path) -> None:
    """An image too small for five half-size crops is a bad image of the dataset, named as such."""
    width, height = image.size
    if width < 2 or height < 2:
        raise ImageReadError(f"{path}: image of {width}x{height} pixels is too small for five half-size "
                             "crops (at least 2x2); remove it or set data.skip_bad_images=true", path)


def _items_of(sample: Any, recipe: dict[str, Any]) -> list[tuple[Image.Image, Image.Image | None]]:
    """The (image, label) items of one source image under ``recipe``."""
    if recipe["crop_rule"] == "whole":
        return [whole_view(sample.image, sample.label, recipe["crop_size"])]
    stored = recipe["stored_size"]
    return five_crops(sample.image, sample.label, None if stored == "source" else stored)


def _crop_image(raw: RawDataset, i: int, outputs: _Outputs) -> ImageReadError | None:
    """Write the missing items of source image ``i``; returns the read error of a skipped image."""
    stems = outputs.stems(raw.key_of(i))
    if all(outputs.has(stem) for stem in stems):
        return None
    try:
        sample = raw.read(i)
        if outputs.recipe["crop_rule"] == "five":
            _check_croppable(sample.image, raw.path_of(i))
    except ImageReadError as error:
        if not raw.skip_bad_images:
            if "skip_bad_images" in str(error):
                raise
            raise ImageReadError(f"{error}; to skip unreadable images instead, add data.skip_bad_images=true",
                                 error.path) from error
        return error
    image_format = outputs.recipe["crop_format"]
    for stem, (image, label) in zip(stems, _items_of(sample, outputs.recipe)):
        if stem + outputs.suffix not in outputs.have_images:
            _save(image, outputs.images / (stem + outputs.suffix), image_format)
        if label is not None and outputs.labels is not None and stem + ".png" not in outputs.have_labels:
            _save(label, outputs.labels / (stem + ".png"), "png")
    return None


def _crop_all(raw: RawDataset, outputs: _Outputs, num_workers: int) -> Iterator[ImageReadError | None]:
    """``_crop_image`` of every item in order, in ``num_workers`` threads (0: this thread)."""
    items = range(len(raw))
    if num_workers <= 0:
        yield from (_crop_image(raw, i, outputs) for i in items)
        return
    # Pillow releases the GIL while decoding, resizing and encoding, so threads scale.
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        try:
            yield from pool.map(lambda i: _crop_image(raw, i, outputs), items)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def prepare_training_set(raw: RawDataset, out_dir: str | Path, crop_size: int = 224, *, crop_rule: CropRule = "five",
                         crop_format: CropFormat = "jpeg", num_workers: int = 0) -> Path:
    """Write the training items of ``raw`` by ``crop_rule`` / ``crop_format`` (module docstring)
    to ``out_dir`` and return ``out_dir``.

    ``num_workers`` > 0 decodes/encodes in that many threads. Unreadable images raise
    ImageReadError, or are skipped (recorded under ``"skipped"`` in the manifest) when
    ``raw.skip_bad_images`` is set; a complete rerun does not retry them — delete
    ``manifest.json`` to do so. Progress is shown when the ``hpseg`` logger shows INFO.
    """
    if crop_size < 1:
        raise InvalidInputError(f"crop_size must be positive, got {crop_size}")
    recipe = training_recipe(crop_rule, crop_format, crop_size)
    out_dir = Path(out_dir)
    previous = _previous_manifest(out_dir, raw, recipe)
    outputs = _Outputs.open(out_dir, raw.has_labels, recipe)
    if previous is not None:
        if _is_complete(previous, raw, outputs):
            return out_dir  # nothing to read or write
        # An incomplete or outdated run: drop its manifest so nobody trains on it while we resume.
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    _check_existing_crop_size(outputs, out_dir)
    for folder in (outputs.images, outputs.labels):
        if folder is not None:
            remove_stale_temporaries(folder)

    crops: list[str] = []
    skipped_paths: list[str] = []
    skipped_keys: list[str] = []
    results = _crop_all(raw, outputs, num_workers)
    bar = progress_bar(results, _log, total=len(raw), desc=f"{crop_rule}-crop {raw.name}/{raw.split}", unit="img")
    for i, error in enumerate(bar):
        key = raw.key_of(i)
        if error is None:
            crops.extend(outputs.stems(key))
        else:
            raw.note_skipped(raw.path_of(i), error)
            skipped_paths.append(str(raw.path_of(i)))
            skipped_keys.append(key)
    write_json_atomic(_manifest(raw, recipe, crops, skipped_paths, skipped_keys), out_dir / MANIFEST_NAME, indent=1)
    return out_dir


def prepare_five_crops(raw: RawDataset, out_dir: str | Path, crop_size: int = 224, *, crop_format: CropFormat = "jpeg",
                       num_workers: int = 0) -> Path:
    """:func:`prepare_training_set` with the five-crop rule (COCO-Stuff, Cityscapes, folders)."""
    return prepare_training_set(raw, out_dir, crop_size, crop_rule="five", crop_format=crop_format,
                                num_workers=num_workers)


def _manifest(raw: RawDataset, recipe: dict[str, Any], crops: list[str], skipped_paths: list[str],
              skipped_keys: list[str]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": raw.name,
        "split": raw.split,
        "source_root": str(Path(raw.root).resolve()),
        **recipe,
        "n_source_images": len(raw),
        "n_classes": raw.n_classes,
        "class_names": raw.class_names,
        "has_labels": raw.has_labels,
        "skipped": skipped_paths,
        "skipped_keys": skipped_keys,
        "crops": crops,
    }
