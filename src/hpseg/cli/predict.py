"""``hpseg predict``: segment any images with a trained checkpoint.

    hpseg predict photos/ more/*.jpg one.png --checkpoint run/checkpoints/best.pt --out preds/

The geometry (resize, pad, tile, average, upsample) is :mod:`hpseg.inference.tiling`'s.

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
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hpseg.cli.errors import UsageError
from hpseg.data import ImageReadError, read_image
from hpseg.data.datasets import walk_files
from hpseg.data.images import IMAGE_SUFFIXES
from hpseg.export.onnx_runner import OnnxRuntimeMissingError, OnnxSegmenter
from hpseg.files import OutputFolder, holds_only, remove_stale_temporaries, write_json_atomic
from hpseg.inference.crf import require_crf
from hpseg.inference.segmenter import Segmenter, check_head, load
from hpseg.logs import progress_bar
from hpseg.runtime import default_crf_workers, fit_threads
from hpseg.visualize import index_png, overlay, palette, save_image_atomic, segmentation_figure

__all__ = ["collect_images", "predict_paths"]

logger = logging.getLogger(__name__)

#: The folders ``hpseg predict`` writes into ``--out``.
OUTPUT_FOLDERS = ("labels", "overlays", "figures")

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


def _walk_images(folder: Path, exclude: Path | None, problems: list[tuple[str, str]]) -> list[Path]:
    """The images under ``folder`` (links followed, each folder read once), in path order; the
    folders left out (unreadable, reached twice through a link) are added to ``problems``."""
    files, left_out = walk_files(folder, lambda name: name.lower().endswith(IMAGE_SUFFIXES))
    problems.extend((str(path), f"folder left out: {reason}") for path, reason in left_out)
    folders = {file.parent: None for file in files}  # in the walk's order: a folder's files before its subfolders'
    order = {parent: index for index, parent in enumerate(folders)}
    kept = [f for f in files if exclude is None or not _is_within(f, exclude)]
    return sorted(kept, key=lambda f: (order[f.parent], f.name))


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, RuntimeError, OSError):  # not below it, or a symlink loop (it is nowhere)
        return False


def _resolved(path: Path) -> Path | None:
    """``path`` with its links resolved, None for a symlink loop (RuntimeError before Python 3.13)."""
    try:
        return path.resolve(strict=True)
    except (RuntimeError, OSError):
        return None


def check_out_folder(inputs: Sequence[str], out: Path) -> None:
    """Refuse an input folder or file inside ``out`` (outside an earlier prediction's own folders):
    its images would be left out as outputs, and ``out/labels/`` could be a dataset's labels."""
    for argument in inputs:
        path = Path(_glob_base(argument) if _has_magic(argument) and not Path(argument).exists() else argument)
        if path.exists() and _is_within(path, out) and not any(_is_within(path, out / sub) for sub in OUTPUT_FOLDERS):
            raise UsageError(f"the input {argument} lies inside --out {out}: the outputs ({', '.join(OUTPUT_FOLDERS)}) "
                             "would mix with the inputs (and a dataset's labels/ would be overwritten); pick an "
                             "--out folder outside the inputs")


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
                    files.extend(_walk_images(m, exclude_path, problems))
                elif not m.name.startswith("."):
                    files.append(m)
            if not files:
                problems.append((argument, "the pattern matches no image"))
            base = _glob_base(argument)
            found.extend((f, base) for f in files)
        elif path.is_dir():
            files = _walk_images(path, exclude_path, problems)
            if not files:
                problems.append((argument, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder"))
            found.extend((f, path) for f in files)
        elif path.exists():
            found.append((path, path.parent))
        elif path.is_symlink():
            problems.append((argument, "a broken link or a symlink loop"))
        else:
            problems.append((argument, "no such file or folder"))

    unique: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for file, base in found:
        if exclude_path is not None and _is_within(file, exclude_path):
            continue
        key = _resolved(file)
        if key is None:
            problems.append((str(file), "a broken link or a symlink loop (it points to itself)"))
            continue
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


def _write_outputs(out: Path, job: ImageJob, image: Image.Image, labels: np.ndarray, names: Sequence[str],
                   figure: bool, alpha: float) -> dict[str, str]:
    """Write one image's files atomically; on any failure remove the ones already written."""
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
            save_image_atomic(segmentation_figure(image, labels, names), targets["figure"])
            written.append(targets["figure"])
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return {key: str(path) for key, path in targets.items()}


def _summary(segmenter: Segmenter | OnnxSegmenter, checkpoint: str | Path, head: str, names: list[str], records: list[dict[str, Any]],
             skipped: list[dict[str, str]]) -> dict[str, Any]:
    """``predictions.json``: what the values mean, the settings, the files written and skipped."""
    colours = palette(len(names))
    return {
        "checkpoint": str(checkpoint),
        "head": head,
        "values": ("class ids" if head == "linear" or segmenter.cluster_to_class is not None else "cluster ids")
                  + "; 255 in the index PNGs = unmatched cluster",
        "mapping": segmenter.mapping_source,
        "labels": [{"id": i, "name": name, "colour": [int(c) for c in colours[i]]} for i, name in enumerate(names)],
        "crf": segmenter.crf,
        "size": segmenter.tiling.size,
        "window": segmenter.tiling.window,
        "succeeded": len(records),
        "images": records,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------------------- the job


def _jobs_or_fail(inputs: Sequence[str], out: Path) -> tuple[list[ImageJob], list[dict[str, str]]]:
    """The images to segment and the arguments skipped (logged); UsageError when there is none."""
    check_out_folder(inputs, out)
    jobs, problems = collect_images(inputs, exclude=out)
    skipped = [{"path": argument, "reason": reason} for argument, reason in problems]
    for entry in skipped:
        logger.warning("skipping %s: %s", entry["path"], entry["reason"])
    if not jobs:
        raise UsageError("no images to segment in " + ", ".join(map(str, inputs)))
    return jobs, skipped


def _check_sizes(**values: int | None) -> None:
    """--batch-size at least 1, --size and --window not negative (None: the default)."""
    for name, value in values.items():
        lowest = 1 if name == "batch_size" else 0
        if value is not None and value < lowest:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least {lowest}")


def _remove_stale_temporaries(out: Path) -> None:
    """Delete the temporary files a killed ``hpseg predict`` left in ``out``'s output folders."""
    folders = [dirpath for sub in OUTPUT_FOLDERS for dirpath, _, _ in os.walk(out / sub)]
    stale = list(out.glob(".predictions.json.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    removed = len(stale) + sum(remove_stale_temporaries(folder) for folder in folders)
    if removed:
        logger.info("removed %d temporary file(s) left in %s by an interrupted run", removed, out)


def _readable_images(jobs: list[ImageJob], skipped: list[dict[str, str]]) -> Iterator[tuple[ImageJob, Image.Image]]:
    """(job, image) of each job whose file reads; the others are logged and added to ``skipped``."""
    for job in progress_bar(jobs, logger, desc="predict", unit="image", dynamic_ncols=True):
        try:
            image = read_image(job.path)
        except ImageReadError as error:
            skipped.append({"path": str(job.path), "reason": str(error)})
            logger.warning("skipping %s: %s", job.path, error)
            continue
        yield job, image


def _segment_all(segmenter: Segmenter | OnnxSegmenter, jobs: list[ImageJob], out: Path, head: str, names: list[str], figure: bool,
                 alpha: float, skipped: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Segment and write every job, several images' windows per backbone pass
    (``Segmenter.segment_many``); unreadable files are logged and added to ``skipped``."""
    in_flight: deque[tuple[ImageJob, Image.Image]] = deque()  # read and handed on, label map not yet back

    def images() -> Iterator[Image.Image]:
        for job, image in _readable_images(jobs, skipped):
            in_flight.append((job, image))
            yield image

    records = []
    for labels in segmenter.segment_many(images(), head=head):  # in input order
        job, image = in_flight.popleft()
        files = _write_outputs(out, job, image, labels, names, figure, alpha)
        records.append({"input": str(job.path), "size": [image.height, image.width], **files})
    return records


def predict_paths(
    inputs: Sequence[str],
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    head: str | None = None,
    crf: bool = False,
    figure: bool = False,
    mapping: str | Path | None = "auto",
    size: int | None = None,
    window: int | None = None,
    weights: str | None = None,
    device: str = "auto",
    batch_size: int = 8,
    alpha: float = 0.5,
    onnx: str | Path | None = None,
    crf_workers: int | None = None,
) -> dict[str, Any]:
    """Segment the images named by ``inputs`` and write the outputs to ``out_dir``.

    Returns the summary also written to ``out_dir/predictions.json`` (``succeeded``,
    ``skipped`` [{path, reason}], ``labels`` [{id, name, colour}], settings). ``mapping="auto"``
    uses an evaluation of the checkpoint found beside it, a CRF one first with ``crf``.
    Unreadable files are reported and skipped; raises :class:`UsageError` when there is nothing
    to segment, before loading the checkpoint. ``head`` None: the model's default head (the
    cluster head; the linear head for a released model, :mod:`hpseg.checkpoints.released`). ``onnx``: segment with a model of ``hpseg export
    --format onnx`` through onnxruntime instead (same geometry; its mapping and weights are in it).
    With ``crf``, ``crf_workers`` processes refine the images (default: the cores available to
    this process; 0: in this one) while the backbone goes on.
    """
    if head is not None:
        check_head(head)
    _check_sizes(batch_size=batch_size, size=size, window=window)
    if crf:
        require_crf()  # CRFUnavailableError (with the install hint) before any work
        crf_workers = default_crf_workers(0) if crf_workers is None else crf_workers
    out = Path(out_dir)
    jobs, skipped = _jobs_or_fail(inputs, out)
    folder = OutputFolder(out, "predict",
                          earlier=lambda path: holds_only(path, (*OUTPUT_FOLDERS, "predictions.json"), "predictions.json"))
    folder.check()  # before loading the model
    _remove_stale_temporaries(out)
    segmenter: Segmenter | OnnxSegmenter
    if onnx:
        segmenter = _onnx_segmenter(onnx, size=size, window=window, batch_size=batch_size,
                                    use_mapping=mapping is not None)
        checkpoint = onnx
        head = head or "cluster"
    else:
        segmenter = load(checkpoint, device=device, weights=weights,
                         mapping=(mapping if head in (None, "cluster") else None), crf=crf, size=size, window=window,
                         batch_size=batch_size)
        segmenter.crf_workers = crf_workers
        head = head or segmenter.default_head
    names = segmenter.label_names(head)
    if getattr(segmenter, "random_backbone", False):  # an ONNX model does not record it
        logger.warning("%s was trained on a RANDOMLY INITIALISED backbone (%s, e.g. the demo's): its features carry "
                       "colour and a little texture, nothing semantic, so on real photos its segments are "
                       "meaningless. Train on DINO weights (see `hpseg backbones`) for segments that mean something.",
                       checkpoint, segmenter.backbone.spec.name)
    if head == "cluster" and segmenter.cluster_to_class is None:
        logger.info("labels are cluster ids 0..%d (no cluster->class mapping: run `hpseg eval` on this "
                    "checkpoint, or pass --mapping results.json, to get class names)", segmenter.n_clusters - 1)
    folder.claim()
    fit_threads(crf_workers if crf and crf_workers else 0)  # once the model is there: an error stays one line
    records = _segment_all(segmenter, jobs, out, head, names, figure, alpha, skipped)
    summary = _summary(segmenter, checkpoint, head, names, records, skipped)
    write_json_atomic(summary, out / "predictions.json")
    return summary


def _onnx_segmenter(path: str | Path, **settings: Any) -> OnnxSegmenter:
    """The ONNX runner, its errors about the model (raised by the hpseg-free runtime as
    ``ValueError`` / ``ImportError``) turned into :class:`UsageError`: one line on the command line."""
    try:
        return OnnxSegmenter(path, **settings)
    except (OnnxRuntimeMissingError, ValueError) as error:
        raise UsageError(str(error)) from error


def run_cli(args: Any) -> int:
    """``hpseg predict`` (see :func:`predict_paths`); exit status 1 when no image succeeded."""
    if (args.checkpoint is None) == (args.onnx is None):
        raise UsageError("give either --checkpoint (or --model) or --onnx")
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # predict_paths knows the workers it starts
    if args.onnx and (args.crf or args.mapping or args.weights):
        raise UsageError("--crf, --mapping and --weights need --checkpoint: an ONNX model has its mapping and "
                         "weights built in, and no CRF")
    summary = predict_paths(
        args.paths, args.checkpoint, args.out, head=args.head, crf=args.crf, figure=args.figure,
        mapping=None if args.no_mapping else (args.mapping or "auto"), size=args.size, window=args.window,
        weights=args.weights, device=args.device, batch_size=args.batch_size, onnx=args.onnx,
        crf_workers=args.crf_workers,
    )
    n_ok, n_bad = summary["succeeded"], len(summary["skipped"])
    print(f"segmented {n_ok} image(s) into {args.out} (labels/, overlays/{', figures/' if args.figure else ''}; "
          f"predictions.json says what the values mean)")
    if n_bad:
        print(f"skipped {n_bad}:")
        for entry in summary["skipped"]:
            print(f"  {entry['path']}: {entry['reason']}")
    return 0 if n_ok > 0 else 1
