"""``hpseg predict``: segment any images with a trained checkpoint, and the geometry behind it.

    hpseg predict photos/ more/*.jpg one.png --checkpoint run/checkpoints/best.pt --out preds/

Geometry (shared with the Python API, :mod:`hpseg.api`; one implementation):

1. **Resize.** The image is resized (bilinear, antialiased) so that its *shorter side* equals
   ``size`` -- by default the checkpoint's validation size ``data.val_size`` (320 for the paper's
   presets), the scale the head was validated at. ``size=0`` keeps the image as it is.
2. **Pad.** The resized image is padded on the bottom and right (edge pixels repeated) to a
   multiple of the backbone's patch size.
3. **Tile.** Square windows of ``window`` pixels (default: ``size``, i.e. the validation crop;
   ``window=0``: the whole image in one pass) slide over the padded image with a stride of
   about two thirds of a window, always a multiple of the patch size, so every window's patch
   grid falls on the same global grid; the last window is flush with the bottom/right edge.
   A side shorter than a window is covered by a shorter window.
4. **Average.** Per window the backbone and the head give per-patch scores (cluster head:
   ``<s, c_k / ||c_k||>`` as in evaluation; linear head: the probe's logits); scores of patches
   covered by several windows are averaged.
5. **Upsample.** The patch scores are interpolated bilinearly straight to the *input's*
   resolution (the input pixel centre is mapped through the resize into the patch grid; the
   same sampling as ``F.interpolate(..., mode="bilinear", align_corners=False)``), in bands of
   rows so a large photo never needs a full (K, H, W) score tensor, and the argmax is taken.
   With ``--crf`` the scores are first refined by the dense CRF at the resized resolution (as
   evaluation does at its crop size), then sampled to the input's resolution.

So a label map always has exactly the input image's height and width, whatever its size and
aspect ratio. A ``size``-square image with ``size=window`` gives exactly the label map the
evaluation computes for that crop.

Outputs in ``--out`` (paths mirror the inputs' paths relative to their common folder, so equal
file names in different folders never collide)::

    labels/<rel>.png     index PNG: pixel value = class id (with a cluster->class mapping or the
                         linear head) or cluster id, palette colours; 255 = unmatched cluster
    overlays/<rel>.png   colour overlay on the image
    figures/<rel>.png    with --figure: image | segmentation, legend of the labels present
    predictions.json     what the values mean (names, colours), checkpoint, settings, files, skips

Every file is written atomically (temporary file + rename); an image that fails leaves no file.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "Tiling",
    "collect_images",
    "predict_paths",
    "resample",
    "resample_argmax",
    "resized_shape",
    "window_starts",
]

#: File name endings ``hpseg predict`` picks up when walking a folder (files named explicitly
#: are tried whatever their ending).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm")


# ---------------------------------------------------------------------------------------- geometry


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(H', W') of an image whose shorter side is resized to ``size`` (0: unchanged).

    Same rounding as the validation view (torchvision's): the long side becomes
    ``int(size * long / short)``, at least 1.
    """
    if height < 1 or width < 1:
        raise ValueError(f"empty image of size {width}x{height}")
    if size <= 0:
        return height, width
    if height <= width:
        return size, max(1, int(size * width / height))
    return max(1, int(size * height / width)), size


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` covering ``[0, length)``; the last is flush with the end."""
    if window >= length:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


@dataclass(frozen=True)
class Tiling:
    """How images are resized and cut into windows (see the module docstring).

    Attributes:
        size: shorter side after resizing, 0 = keep the image's size.
        window: side of the square windows in pixels (a multiple of ``patch``), 0 = one window
            over the whole (padded) image.
        patch: the backbone's patch size.
    """

    size: int
    window: int
    patch: int

    def __post_init__(self) -> None:
        if self.size < 0 or self.window < 0 or self.patch < 1:
            raise ValueError(f"invalid tiling: size={self.size}, window={self.window}, patch={self.patch}")
        if self.window % self.patch:
            raise ValueError(f"window {self.window} must be a multiple of the patch size {self.patch}")

    @classmethod
    def create(cls, size: int, window: int | None, patch: int) -> Tiling:
        """``window=None``: the resize size rounded up to the patch size (or whole images when
        ``size`` is 0)."""
        if window is None:
            window = size
        window = int(math.ceil(window / patch) * patch) if window > 0 else 0
        return cls(size=int(size), window=window, patch=int(patch))

    def stride(self, window: int) -> int:
        """Window step: about two thirds of a window, a multiple of the patch size."""
        return max(self.patch, (2 * window // 3) // self.patch * self.patch)

    def padded(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch
        return int(math.ceil(height / p) * p), int(math.ceil(width / p) * p)

    def windows(self, height: int, width: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """For a padded (H, W): the window shape (wh, ww) and the (top, left) offsets."""
        wh = height if self.window == 0 else min(self.window, height)
        ww = width if self.window == 0 else min(self.window, width)
        tops = window_starts(height, wh, self.stride(wh))
        lefts = window_starts(width, ww, self.stride(ww))
        return (wh, ww), [(top, left) for top in tops for left in lefts]


def _source_index(n_out: int, n_in: int, scale: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear source indices and weights, PyTorch's align_corners=False convention."""
    src = (torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale - 0.5
    src = src.clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam = (src - i0.double()).clamp(0.0, 1.0).float()
    return i0, i1, lam


def _resample_rows(scores: torch.Tensor, rows: slice, y: tuple, x: tuple) -> torch.Tensor:
    y0, y1, ly = (t[rows] for t in y)
    x0, x1, lx = x
    top, bottom = scores[:, y0], scores[:, y1]  # (K, r, w_in)
    band = top + (bottom - top) * ly[None, :, None]
    left, right = band[:, :, x0], band[:, :, x1]
    return left + (right - left) * lx[None, None, :]


def resample(scores: torch.Tensor, size: tuple[int, int], scale: tuple[float, float] | None = None) -> torch.Tensor:
    """Bilinear resampling of (K, h, w) scores to (K, H, W).

    The output pixel centre ``y + 0.5`` maps to the input coordinate ``(y + 0.5) * scale - 0.5``;
    ``scale=None`` means ``(h / H, w / W)``, which is exactly
    ``F.interpolate(scores[None], size, mode="bilinear", align_corners=False)[0]``.
    """
    k, h, w = scores.shape
    height, width = size
    sy, sx = scale if scale is not None else (h / height, w / width)
    y = _source_index(height, h, sy, scores.device)
    x = _source_index(width, w, sx, scores.device)
    return _resample_rows(scores.float(), slice(None), y, x)


def resample_argmax(
    scores: torch.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float] | None = None,
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """``resample(scores, size, scale).argmax(0)`` computed in bands of rows: (H, W) int64."""
    k, h, w = scores.shape
    height, width = size
    sy, sx = scale if scale is not None else (h / height, w / width)
    y = _source_index(height, h, sy, scores.device)
    x = _source_index(width, w, sx, scores.device)
    rows = max(1, max_elements // max(1, k * width))
    scores = scores.float()
    out = torch.empty((height, width), dtype=torch.int64, device=scores.device)
    for start in range(0, height, rows):
        band = slice(start, min(height, start + rows))
        out[band] = _resample_rows(scores, band, y, x).argmax(0)
    return out


@torch.no_grad()
def tile_and_average(
    image: torch.Tensor,
    tiling: Tiling,
    compute: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 8,
) -> torch.Tensor:
    """Run ``compute`` over the windows of a padded (3, H, W) image and average on the patch grid.

    ``compute`` maps (B, 3, wh, ww) windows to (B, X, wh/p, ww/p) per-patch values; the result is
    (X, H/p, W/p), each patch the mean over the windows that cover it.
    """
    p = tiling.patch
    height, width = image.shape[-2:]
    if height % p or width % p:
        raise ValueError(f"padded image {height}x{width} is not a multiple of the patch size {p}")
    (wh, ww), offsets = tiling.windows(height, width)
    total: torch.Tensor | None = None
    count = torch.zeros((1, height // p, width // p), device=image.device)
    for i in range(0, len(offsets), max(1, batch_size)):
        chunk = offsets[i : i + batch_size]
        windows = torch.stack([image[:, top : top + wh, left : left + ww] for top, left in chunk])
        values = compute(windows).float()
        if total is None:
            total = torch.zeros((values.shape[1], height // p, width // p), device=image.device)
        for (top, left), value in zip(chunk, values):
            rows, cols = slice(top // p, (top + wh) // p), slice(left // p, (left + ww) // p)
            total[:, rows, cols] += value
            count[:, rows, cols] += 1
    assert total is not None
    return total / count


# ---------------------------------------------------------------------------------------- inputs


def _has_magic(text: str) -> bool:
    return glob.has_magic(text)


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard component."""
    parts = Path(pattern).parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if _has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _walk_images(folder: Path, exclude: Path | None) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and (exclude is None or not _is_within(here / d, exclude))
        )
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(here / name)
    return found


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


@dataclass
class ImageJob:
    """One input file and the path of its outputs relative to ``--out`` (no suffix)."""

    path: Path
    relative: Path


def collect_images(inputs: Sequence[str], exclude: str | Path | None = None) -> tuple[list[ImageJob], list[tuple[str, str]]]:
    """Expand files, folders (recursively) and glob patterns into images to segment.

    Output names are the files' paths relative to the common folder of all inputs (a folder
    argument counts as its own folder, a glob as its folder before the first wildcard), without
    the suffix; files that differ only in their suffix keep it (``a.jpg`` -> ``a.jpg``,
    ``a.png`` -> ``a.png``). Files under ``exclude`` (the output folder) are left out.
    Returns (jobs in input order, without duplicates; problems as (argument, reason)).
    """
    exclude_path = Path(exclude) if exclude is not None else None
    problems: list[tuple[str, str]] = []
    found: list[tuple[Path, Path]] = []  # (file, base folder)
    for argument in inputs:
        path = Path(argument)
        if _has_magic(argument) and not path.exists():
            matches = sorted(glob.glob(argument, recursive=True))
            files = []
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    files.extend(_walk_images(m, exclude_path))
                elif not m.name.startswith("."):
                    files.append(m)
            if not files:
                problems.append((argument, "the pattern matches no image"))
            base = _glob_base(argument)
            found.extend((f, base) for f in files)
        elif path.is_dir():
            files = _walk_images(path, exclude_path)
            if not files:
                problems.append((argument, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"))
            found.extend((f, path) for f in files)
        elif path.exists():
            found.append((path, path.parent))
        else:
            problems.append((argument, "no such file or folder"))

    unique: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for file, base in found:
        if exclude_path is not None and _is_within(file, exclude_path):
            continue
        key = file.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((file, base))
    if not unique:
        return [], problems
    bases = [os.path.abspath(base) for _, base in unique]
    root = Path(os.path.commonpath(bases))
    relatives = [Path(os.path.relpath(os.path.abspath(file), root)) for file, _ in unique]
    stems: dict[Path, int] = {}
    for rel in relatives:
        stems[rel.with_suffix("")] = stems.get(rel.with_suffix(""), 0) + 1
    jobs = []
    for (file, _), rel in zip(unique, relatives):
        out = rel.with_suffix("") if stems[rel.with_suffix("")] == 1 else rel
        jobs.append(ImageJob(file, out))
    return jobs, problems


# ---------------------------------------------------------------------------------------- outputs


def _legend(entries: Sequence[tuple[str, tuple[int, int, int]]], width: int) -> Any:
    """A white strip with one coloured square and name per entry, wrapped to ``width``."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box, gap, line = 14, 16, 22
    x, y, placed = 8, 6, []
    for name, colour in entries:
        w = box + 6 + int(probe.textlength(name, font=font))
        if x > 8 and x + w > width - 8:
            x, y = 8, y + line
        placed.append((x, y, name, colour))
        x += w + gap
    strip = Image.new("RGB", (width, y + line + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, name, colour in placed:
        draw.rectangle([x, y + 2, x + box, y + 2 + box], fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((x + box + 6, y + 2 + box // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return strip


def figure_panel(image: Any, labels: np.ndarray, names: Sequence[str], cell: int = 384) -> Any:
    """image | segmentation side by side, with a legend of the labels present."""
    from PIL import Image

    from hpseg.visualize import figure_grid, palette

    grid = figure_grid([[image, labels]], titles=["image", "segmentation"], cell=cell)
    present = [int(v) for v in np.unique(labels) if 0 <= v < 255]
    colours = palette(max(present) + 1) if present else np.zeros((0, 3), np.uint8)
    entries = [(names[v] if v < len(names) else f"id {v}", tuple(colours[v])) for v in present]
    if (labels < 0).any() or (labels == 255).any():
        entries.append(("unmatched / ignored", (0, 0, 0)))
    legend = _legend(entries, grid.width)
    panel = Image.new("RGB", (grid.width, grid.height + legend.height), (255, 255, 255))
    panel.paste(grid, (0, 0))
    panel.paste(legend, (0, grid.height))
    return panel


def _write_outputs(out: Path, job: ImageJob, image: Any, labels: np.ndarray, names: Sequence[str],
                   figure: bool, alpha: float) -> dict[str, str]:
    """Write one image's files atomically; on any failure remove the ones already written."""
    from hpseg.visualize import index_png, overlay, save_image_atomic

    rel = job.relative.as_posix()
    targets = {"labels": out / "labels" / f"{rel}.png", "overlay": out / "overlays" / f"{rel}.png"}
    if figure:
        targets["figure"] = out / "figures" / f"{rel}.png"
    written: list[Path] = []
    try:
        index_png(labels, targets["labels"])
        written.append(targets["labels"])
        save_image_atomic(overlay(image, labels, alpha=alpha), targets["overlay"])
        written.append(targets["overlay"])
        if figure:
            save_image_atomic(figure_panel(image, labels, names), targets["figure"])
            written.append(targets["figure"])
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return {key: str(path) for key, path in targets.items()}


# ---------------------------------------------------------------------------------------- the job


def predict_paths(
    inputs: Sequence[str],
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    head: str = "cluster",
    crf: bool = False,
    figure: bool = False,
    mapping: str | Path | None = "auto",
    size: int | None = None,
    window: int | None = None,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    alpha: float = 0.5,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    onnx: str | Path | None = None,
) -> dict[str, Any]:
    """Segment the images named by ``inputs`` and write the outputs to ``out_dir``.

    Returns the summary also written to ``out_dir/predictions.json`` (``succeeded``,
    ``skipped`` [{path, reason}], ``labels`` [{id, name, colour}], settings).
    Unreadable files are reported and skipped; raises ``ValueError`` when there is nothing to
    segment, before loading the checkpoint.
    """
    from tqdm import tqdm

    from hpseg.api import load
    from hpseg.data import ImageReadError, read_image
    from hpseg.evaluate import write_json_atomic
    from hpseg.visualize import palette

    say = echo or (lambda message: tqdm.write(message, file=sys.stderr))
    if head not in ("cluster", "linear"):
        raise ValueError(f"head must be 'cluster' or 'linear', got {head!r}")
    if crf:
        from hpseg.crf import _import_densecrf

        _import_densecrf()  # CRFUnavailableError (with the install hint) before any work
    out = Path(out_dir)
    jobs, problems = collect_images(inputs, exclude=out)
    skipped = [{"path": argument, "reason": reason} for argument, reason in problems]
    for entry in skipped:
        say(f"skipping {entry['path']}: {entry['reason']}")
    if not jobs:
        raise ValueError("no images to segment in " + ", ".join(map(str, inputs)))

    if onnx:  # the exported graph through onnxruntime, with the same geometry (hpseg.export.runtime)
        from hpseg.export.runtime import OnnxSegmenter

        segmenter = OnnxSegmenter(onnx, size=size, window=window, batch_size=batch_size,
                                  use_mapping=mapping is not None)
        checkpoint = onnx
    else:
        segmenter = load(checkpoint, device=device, weights=weights,
                         mapping=(mapping if head == "cluster" else None), size=size, window=window, echo=say)
    segmenter.batch_size = batch_size
    names = segmenter.label_names(head)
    if head == "cluster" and segmenter.cluster_to_class is None:
        say(f"labels are cluster ids 0..{segmenter.n_clusters - 1} (no cluster->class mapping: run "
            "`hpseg eval` on this checkpoint, or pass --mapping results.json, to get class names)")

    records = []
    bar = tqdm(jobs, desc="predict", unit="image", disable=not progress, dynamic_ncols=True)
    for job in bar:
        try:
            image = read_image(job.path)
        except ImageReadError as error:
            skipped.append({"path": str(job.path), "reason": str(error)})
            say(f"skipping {job.path}: {error}")
            continue
        labels = segmenter.segment(image, head=head, crf=crf)
        files = _write_outputs(out, job, image, labels, names, figure, alpha)
        records.append({"input": str(job.path), "size": [image.height, image.width], **files})
    bar.close()

    colours = palette(len(names))
    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "head": head,
        "values": ("class ids" if head == "linear" or segmenter.cluster_to_class is not None else "cluster ids")
                  + "; 255 in the index PNGs = unmatched cluster",
        "mapping": segmenter.mapping_source,
        "labels": [{"id": i, "name": name, "colour": [int(c) for c in colours[i]]} for i, name in enumerate(names)],
        "crf": crf,
        "size": segmenter.tiling.size,
        "window": segmenter.tiling.window,
        "succeeded": len(records),
        "images": records,
        "skipped": skipped,
    }
    write_json_atomic(summary, out / "predictions.json")
    return summary


def run_cli(args: Any) -> int:
    """``hpseg predict`` (see :func:`predict_paths`); exit status 1 when no image succeeded."""
    onnx = getattr(args, "onnx", None)
    if (args.checkpoint is None) == (onnx is None):
        raise ValueError("give either --checkpoint or --onnx")
    if onnx and (args.crf or args.mapping or args.weights):
        raise ValueError("--crf, --mapping and --weights need --checkpoint: an ONNX model has its mapping and "
                         "weights built in, and no CRF")
    summary = predict_paths(
        args.paths, args.checkpoint, args.out, head=args.head, crf=args.crf, figure=args.figure,
        mapping=None if args.no_mapping else (args.mapping or "auto"), size=args.size, window=args.window,
        weights=args.weights, device=args.device, batch_size=args.batch_size, progress=not args.no_progress,
        onnx=onnx,
    )
    n_ok, n_bad = summary["succeeded"], len(summary["skipped"])
    print(f"segmented {n_ok} image(s) into {args.out} (labels/, overlays/{', figures/' if args.figure else ''}; "
          f"predictions.json says what the values mean)")
    if n_bad:
        print(f"skipped {n_bad}:")
        for entry in summary["skipped"]:
            print(f"  {entry['path']}: {entry['reason']}")
    return 0 if n_ok > 0 else 1
