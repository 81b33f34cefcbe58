"""Building a feature cache (``hpseg cache``): resumable, batch by batch, with a size estimate first."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpseg.backbones import Backbone
from hpseg.data import TrainCrops
from hpseg.errors import InvalidInputError
from hpseg.files import write_json_atomic
from hpseg.logs import progress_bar
from hpseg.runtime import autocast
from hpseg.training.cache.identity import (
    FEATURE_FILES,
    META_NAME,
    PROGRESS_NAME,
    WEIGHTS_FILE,
    FeatureCacheError,
    cache_identity,
    cache_layout,
    cache_size,
    files_ok,
    identity_mismatches,
    open_arrays,
    read_json,
)
from hpseg.training.features import make_loader, neighbour_weights

logger = logging.getLogger(__name__)


@dataclass
class _Build:
    """One build: where it writes, what it computes and how."""

    backbone: Backbone
    crops: TrainCrops
    cache_dir: Path
    identity: dict[str, Any]
    layout: dict[str, Any]
    dtype: str
    sigma: float
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def n(self) -> int:
        return len(self.crops)

    def recorded_dtype(self, record: dict[str, Any]) -> Any:
        return record.get("features", {}).get("dtype")


def build_feature_cache(
    backbone: Backbone,
    prepared_dir: str | Path,
    cache_dir: str | Path,
    *,
    sigma: float,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    dtype: str = "float16",
    num_workers: int = 0,
    weights_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Compute f and the LHP neighbour weights of every crop in ``prepared_dir`` into ``cache_dir``.

    Resumable: crops are written in order, batch by batch, and ``progress.json`` records how many
    are done after each batch (data flushed first); rerunning continues from there, and on a
    complete, valid cache returns at once. Before starting, the size is logged and the free
    space checked (``FeatureCacheError`` naming the directory, needed and free bytes).

    Args:
        backbone: the frozen backbone (moved to ``device``).
        sigma: LHP σ (``method.sigma``).
        dtype: storage of f, "float16" (default) or "float32".
        weights_path: where the backbone weights came from (recorded only; the check is the
            fingerprint).
        overwrite: replace a complete cache that does not fit (another backbone, σ, data ...);
            without it such a cache is an error. Incomplete caches of another identity are
            always restarted.
    Returns:
        ``cache_dir``.
    """
    if dtype not in FEATURE_FILES:
        raise InvalidInputError(f"dtype must be one of {sorted(FEATURE_FILES)}, got {dtype!r}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    backbone.to(device)
    crops = TrainCrops(prepared_dir, with_augmented=False)
    if len(crops) == 0:
        raise FeatureCacheError(f"{prepared_dir} holds no training crops: nothing to cache")
    identity = cache_identity(backbone, crops, sigma)
    build = _Build(backbone, crops, Path(cache_dir), identity, cache_layout(identity, dtype), dtype, sigma, device,
                   amp_dtype)
    if _complete_and_current(build, overwrite):
        logger.info(f"feature cache {build.cache_dir} is complete and up to date ({build.n} crops)")
        return build.cache_dir
    completed = _resumable_crops(build)
    _announce_and_check_space(build, completed)
    record = {**identity, **build.layout, "completed": completed, "dtype": dtype,
              "amp_dtype": _dtype_name(amp_dtype), "device": str(device), "batch_size": batch_size,
              "weights_path": weights_path, "prepared_dir": str(Path(prepared_dir).absolute())}
    started = time.time()
    _write_crops(build, record, batch_size, num_workers)
    record["completed"] = build.n
    record["build_seconds"] = round(time.time() - started, 3)
    write_json_atomic(record, build.cache_dir / META_NAME, indent=1)  # last: its presence means "complete"
    (build.cache_dir / PROGRESS_NAME).unlink(missing_ok=True)
    return build.cache_dir


def _complete_and_current(build: _Build, overwrite: bool) -> bool:
    """True for a complete cache of this identity; otherwise leaves the directory incomplete
    (no ``meta.json``). A complete cache of another identity is an error unless ``overwrite``."""
    meta_path = build.cache_dir / META_NAME
    old_meta = read_json(meta_path) if meta_path.is_file() else None
    if old_meta is None:
        meta_path.unlink(missing_ok=True)  # an unreadable meta.json: treat the cache as incomplete
        return False
    problems = identity_mismatches(old_meta, build.identity)
    if not problems and build.recorded_dtype(old_meta) != build.dtype:
        problems = [f"feature dtype: {build.recorded_dtype(old_meta)} in the cache, {build.dtype} now"]
    if not problems and old_meta.get("completed") == build.n and files_ok(build.cache_dir, build.layout):
        return True
    if problems and not overwrite:
        raise FeatureCacheError(
            f"{build.cache_dir} already holds a feature cache built differently ({'; '.join(problems)}); "
            "pass --overwrite (overwrite=True) to replace it, or choose another directory"
        )
    meta_path.unlink()  # from here on the directory is an incomplete cache
    return False


def _resumable_crops(build: _Build) -> int:
    """How many crops an interrupted build of the same identity already wrote (0 if none)."""
    progress_path = build.cache_dir / PROGRESS_NAME
    old = read_json(progress_path) if progress_path.is_file() else None
    if old is None:
        return 0
    same = not identity_mismatches(old, build.identity) and build.recorded_dtype(old) == build.dtype
    done = old.get("completed")
    if same and isinstance(done, int) and 0 <= done <= build.n and files_ok(build.cache_dir, build.layout):
        return done
    logger.info(f"{build.cache_dir}: discarding a partial cache of another configuration")
    return 0


def _announce_and_check_space(build: _Build, completed: int) -> None:
    """Log the size of the cache; raise FeatureCacheError when the disk cannot hold what is left."""
    identity, cache_dir = build.identity, build.cache_dir
    channels, (h, w) = identity["backbone"]["embed_dim"], identity["grid"]
    sizes = cache_size(build.n, channels, (h, w), build.dtype)
    needed = sizes["per_crop"] * (build.n - completed)
    logger.info(
        f"feature cache of {build.n} crops ({build.backbone.spec.name}, {build.crops.crop_size} px, grid {h}x{w}, "
        f"C={channels}): features {_human(sizes['features'])} ({build.dtype}) + "
        f"neighbour weights {_human(sizes['neighbour_weights'])} (float32) = {_human(sizes['total'])}"
        + (f"; {completed} crops already done, {_human(needed)} to write" if completed else "")
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(_existing_ancestor(cache_dir)).free
    if needed > free:
        raise FeatureCacheError(
            f"not enough disk space for the feature cache in {cache_dir}: it needs {needed} bytes "
            f"({_human(needed)}), {free} bytes ({_human(free)}) are free; free some space, choose another "
            "directory (--out / data.feature_cache=DIR), or store float16 features (--dtype float16)"
        )


def _open_for_writing(build: _Build, completed: int) -> tuple[np.memmap, np.memmap]:
    """The cache's arrays, opened to continue after ``completed`` crops (new files when 0)."""
    # Files of another layout (e.g. float32 features after float16 ones) are stale.
    keep = {entry["file"] for entry in build.layout.values()}
    for name in set(FEATURE_FILES.values()) | {WEIGHTS_FILE}:
        if name not in keep or completed == 0:
            (build.cache_dir / name).unlink(missing_ok=True)
    return open_arrays(build.cache_dir, build.layout, "r+" if completed else "w+")


def _write_crops(build: _Build, record: dict[str, Any], batch_size: int, num_workers: int) -> None:
    """Compute and write the crops from ``record["completed"]`` on, marking progress after each batch."""
    progress_path = build.cache_dir / PROGRESS_NAME
    features, weights = _open_for_writing(build, record["completed"])
    write_json_atomic(record, progress_path, indent=1)
    order = list(range(record["completed"], build.n))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    loader = make_loader(build.crops, batches, num_workers, build.device)
    try:
        for indices, batch in progress_bar(zip(batches, loader), logger, total=len(batches), unit="batch",
                                           desc=f"feature cache {build.backbone.spec.name}", dynamic_ncols=True):
            stored, neighbour = _compute(build, batch["image"], indices)
            start, stop = indices[0], indices[-1] + 1
            features[start:stop] = stored.cpu().numpy()
            weights[start:stop] = neighbour.float().cpu().numpy()
            # Data first, then the marker: a crash between the two only recomputes this batch.
            features.flush()
            weights.flush()
            record["completed"] = stop
            write_json_atomic(record, progress_path, indent=1)
    finally:
        del features, weights


def _compute(build: _Build, images: torch.Tensor, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) features in the storage dtype and (B, h*w, 9) LHP weights of a batch of crops."""
    with torch.no_grad(), autocast(build.device, build.amp_dtype):
        out = build.backbone(images.to(build.device, non_blocking=True), with_attention=True)
    neighbour = neighbour_weights(out, build.backbone, build.sigma)
    if not torch.isfinite(out.features).all():
        raise FeatureCacheError(f"the backbone gave non-finite features for crops {indices[0]}..{indices[-1]}")
    stored = out.features.float().to(getattr(torch, build.dtype))
    if not torch.isfinite(stored).all():
        raise FeatureCacheError(
            f"backbone features of crops {indices[0]}..{indices[-1]} exceed the float16 range (±65504): "
            "build the cache with --dtype float32"
        )
    return stored, neighbour


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path
