"""Feature cache: the frozen backbone's outputs on the training crops, computed once.

The backbone is frozen and the main training view is the prepared crop itself (spec §7: no
random geometric augmentation), so its patch features ``f`` and its LHP neighbour weights
(spec §4, after the percentile clamp, softmax × σ, below-mean cut and 3×3 restriction) are the
same at every epoch. :func:`build_feature_cache` (``hpseg cache``) computes them once;
:class:`CachedFeatures` then serves training steps from disk with the interface of
:class:`hpseg.training.features.BackboneFeatures`. Only the photometric view of the consistency loss
still needs the backbone during training (and nothing does with α = 0); validation always
runs the backbone on the validation images.

Layout of a cache directory (``N`` crops, ``C`` channels, ``h × w`` patch grid)::

    features.f16            raw np.memmap, float16 (N, C, h, w)  ("features.f32" with dtype float32)
    neighbour_weights.f32   raw np.memmap, float32 (N, h*w, 9)   (neighbour k = NEIGHBOUR_OFFSETS[k])
    progress.json           while building: the identity below + ``completed`` crops (0..completed-1 done)
    meta.json               written last (then progress.json is removed): its presence means complete

Crop-major layouts make a crop one contiguous block, so a batch is B reads; ``(C, h, w)`` inside
the block is the order training consumes, so a batch needs no transpose. ``f`` is float16 by
default: half the disk and I/O, a relative rounding error of at most 2**-11 (≈ 5e-4), well
below what changes a training run (measured: tests/test_cache.py); ``dtype="float32"`` stores
it exactly. The neighbour weights stay float32: they are 9 numbers per patch against C = 384+
for ``f`` (< 5 % of the cache), and exactness there costs nothing.

**Validity** (checked every time a cache is opened, never assumed): the cache's ``meta.json``
must record the same format version, backbone name, *backbone weights fingerprint* (a hash of
every tensor of the backbone's state dict), patch size and width, crop size and patch grid, LHP
σ and clamp percentiles, and the same prepared training set (dataset, split, number of crops,
hash of the crop names, hash of the bytes of 8 evenly spaced crop images), and hold all N crops
in files of the expected size. The autocast dtype the cache was built with is recorded only.

**Which source ``hpseg train`` uses** (``data.feature_cache``, see :func:`open_feature_cache`):

* unset or ``auto`` (default): the cache at ``<prepared_dir>/feature_cache/<backbone name>``
  if that directory holds one — it must then be valid and complete, otherwise training stops
  with an error saying why and what to do (never silently ignored); if there is none, the
  backbone computes the features at every step and one line says so;
* a path: that cache, which must exist and be valid;
* ``off``: never read a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hpseg.backbones import Backbone
from hpseg.data import TrainCrops, read_label
from hpseg.data.prepare import IGNORE_U8
from hpseg.files import write_json_atomic
from hpseg.method.local_positives import attention_neighbour_weights
from hpseg.runtime import autocast
from hpseg.training.features import StepInputs, make_loader

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "CachedFeatures",
    "FeatureCacheError",
    "backbone_fingerprint",
    "build_feature_cache",
    "cache_size",
    "default_cache_dir",
    "open_feature_cache",
    "resolve_cache_dir",
    "validate_cache",
]

CACHE_FORMAT = "hpseg-feature-cache"
#: 2: LHP weights from the pre-softmax attention scores and DINO's own position interpolation
#: (version 1 caches hold weights computed from the probabilities: wrong, refused).
CACHE_VERSION = 2
META_NAME = "meta.json"
PROGRESS_NAME = "progress.json"
WEIGHTS_FILE = "neighbour_weights.f32"
CLAMP_QUANTILES = (0.1, 0.9)  # the defaults of attention_neighbour_weights (spec §4 step 2)
_FEATURE_FILES = {"float16": "features.f16", "float32": "features.f32"}
_OFF = {"off", "false", "none", "no"}  # `data.feature_cache=off` arrives as "False" (YAML 1.1)
_SAMPLED_IMAGES = 8


_OLD_VERSION = {
    1: ("it was built by an older hpseg (format version 1) whose LHP neighbour weights came from the "
        "attention probabilities instead of the pre-softmax scores, and whose DINO features at grids "
        "other than the native one used timm's position interpolation instead of DINO's"),
}


class FeatureCacheError(ValueError):
    """A feature cache that cannot be built or used; the message names the directory and the fix."""


# ---------------------------------------------------------------------------------- identity


def backbone_fingerprint(backbone: Backbone) -> str:
    """A hash of every tensor (names, dtypes, shapes, values) of the backbone's state dict.

    Two backbones with the same fingerprint compute the same features. Hashing everything costs
    about 0.2 s of one CPU core for ViT-S (22 M parameters), 0.7 s for ViT-B (86 M).
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(backbone.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _dataset_identity(crops: TrainCrops) -> dict[str, Any]:
    """What identifies a prepared training set: its manifest and a sample of its image bytes."""
    manifest = crops.manifest
    names = hashlib.sha256("\n".join(crops.crops).encode()).hexdigest()
    sample = hashlib.sha256()
    n = len(crops)
    for k in sorted({round(i * (n - 1) / (_SAMPLED_IMAGES - 1)) for i in range(_SAMPLED_IMAGES)} if n else set()):
        sample.update(crops.image_path(k).read_bytes())
    return {
        "dataset": manifest["dataset"],
        "split": manifest["split"],
        "n_crops": n,
        "crops_sha256": names,
        "images_sample_sha256": sample.hexdigest(),
    }


def _identity(backbone: Backbone, crops: TrainCrops, sigma: float, fingerprint: str | None = None) -> dict[str, Any]:
    size = crops.crop_size
    h, w = backbone.grid_size(size, size)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "backbone": {
            "name": backbone.spec.name,
            "fingerprint": fingerprint or backbone_fingerprint(backbone),
            "patch_size": backbone.patch_size,
            "embed_dim": backbone.embed_dim,
            "num_prefix_tokens": backbone.num_prefix_tokens,
        },
        "crop_size": size,
        "grid": [h, w],
        "lhp": {"sigma": float(sigma), "clamp_quantiles": list(CLAMP_QUANTILES)},
        "data": _dataset_identity(crops),
    }


_CHECKED = [
    (("format",), "format"),
    (("version",), "format version"),
    (("backbone", "name"), "backbone"),
    (("backbone", "fingerprint"), "backbone weights (fingerprint)"),
    (("backbone", "patch_size"), "patch size"),
    (("backbone", "embed_dim"), "feature width C"),
    (("backbone", "num_prefix_tokens"), "prefix tokens"),
    (("crop_size",), "crop size"),
    (("grid",), "patch grid"),
    (("lhp", "sigma"), "LHP sigma"),
    (("lhp", "clamp_quantiles"), "LHP clamp percentiles"),
    (("data", "dataset"), "dataset"),
    (("data", "split"), "split"),
    (("data", "n_crops"), "number of training crops"),
    (("data", "crops_sha256"), "crop names (hash)"),
    (("data", "images_sample_sha256"), "crop image bytes (hash of a sample)"),
]


def _lookup(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def _mismatches(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    for keys, label in _CHECKED:
        have, want = _lookup(found, keys), _lookup(wanted, keys)
        if have != want:
            out.append(f"{label}: {_short(have)} in the cache, {_short(want)} now")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "...'"


# ---------------------------------------------------------------------------------- sizes


def cache_size(n_crops: int, channels: int, grid: tuple[int, int], dtype: str = "float16") -> dict[str, int]:
    """Bytes of a cache: ``{"features", "neighbour_weights", "total", "per_crop"}``."""
    hw = grid[0] * grid[1]
    features = channels * hw * np.dtype(dtype).itemsize
    weights = hw * 9 * 4
    return {
        "features": n_crops * features,
        "neighbour_weights": n_crops * weights,
        "total": n_crops * (features + weights),
        "per_crop": features + weights,
    }


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


# ---------------------------------------------------------------------------------- files


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _layout(identity: dict[str, Any], dtype: str) -> dict[str, Any]:
    n = identity["data"]["n_crops"]
    c = identity["backbone"]["embed_dim"]
    h, w = identity["grid"]
    return {
        "features": {"file": _FEATURE_FILES[dtype], "dtype": dtype, "shape": [n, c, h, w], "layout": "NCHW"},
        "neighbour_weights": {"file": WEIGHTS_FILE, "dtype": "float32", "shape": [n, h * w, 9],
                              "layout": "N,hw,9 (neighbour k = NEIGHBOUR_OFFSETS[k])"},
    }


def _expected_bytes(entry: dict[str, Any]) -> int:
    return int(np.prod(entry["shape"])) * np.dtype(entry["dtype"]).itemsize


def _files_ok(cache_dir: Path, layout: dict[str, Any]) -> bool:
    for entry in layout.values():
        path = cache_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != _expected_bytes(entry):
            return False
    return True


def _open_arrays(cache_dir: Path, layout: dict[str, Any], mode: str) -> tuple[np.memmap, np.memmap]:
    arrays = []
    for key in ("features", "neighbour_weights"):
        entry = layout[key]
        arrays.append(np.memmap(cache_dir / entry["file"], dtype=entry["dtype"], mode=mode, shape=tuple(entry["shape"])))
    return arrays[0], arrays[1]


# ---------------------------------------------------------------------------------- building


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
    progress: bool = True,
    log: Callable[[str], None] | None = tqdm.write,
) -> Path:
    """Compute f and the LHP neighbour weights of every crop in ``prepared_dir`` into ``cache_dir``.

    Resumable: crops are written in order, batch by batch, and ``progress.json`` records how many
    are done after each batch (data flushed first); rerunning continues from there, and on a
    complete, valid cache returns at once. Before starting, the size is printed and the free
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
        log: where the size estimate and notes go (None: nowhere).
    Returns:
        ``cache_dir``.
    """
    if dtype not in _FEATURE_FILES:
        raise ValueError(f"dtype must be one of {sorted(_FEATURE_FILES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    say = log or (lambda _message: None)
    device = torch.device(device)
    backbone.to(device)
    cache_dir = Path(cache_dir)
    crops = TrainCrops(prepared_dir, with_augmented=False)
    identity = _identity(backbone, crops, sigma)
    layout = _layout(identity, dtype)
    n = len(crops)
    meta_path, progress_path = cache_dir / META_NAME, cache_dir / PROGRESS_NAME

    if n == 0:
        raise FeatureCacheError(f"{prepared_dir} holds no training crops: nothing to cache")
    old_meta = _read_json(meta_path) if meta_path.is_file() else None
    if old_meta is None:
        meta_path.unlink(missing_ok=True)  # an unreadable meta.json: treat the cache as incomplete
    else:
        problems = _mismatches(old_meta, identity)
        if not problems and old_meta.get("features", {}).get("dtype") != dtype:
            problems = [f"feature dtype: {old_meta.get('features', {}).get('dtype')} in the cache, {dtype} now"]
        if not problems and old_meta.get("completed") == n and _files_ok(cache_dir, layout):
            say(f"feature cache {cache_dir} is complete and up to date ({n} crops)")
            return cache_dir
        if problems and not overwrite:
            raise FeatureCacheError(
                f"{cache_dir} already holds a feature cache built differently ({'; '.join(problems)}); "
                "pass --overwrite (overwrite=True) to replace it, or choose another directory"
            )
        meta_path.unlink()  # from here on the directory is an incomplete cache

    completed = 0
    old_progress = _read_json(progress_path) if progress_path.is_file() else None
    if old_progress is not None:
        same = not _mismatches(old_progress, identity) and old_progress.get("features", {}).get("dtype") == dtype
        done = old_progress.get("completed")
        if same and isinstance(done, int) and 0 <= done <= n and _files_ok(cache_dir, layout):
            completed = done
        else:
            say(f"{cache_dir}: discarding a partial cache of another configuration")

    sizes = cache_size(n, identity["backbone"]["embed_dim"], tuple(identity["grid"]), dtype)
    needed = sizes["per_crop"] * (n - completed)
    h, w = identity["grid"]
    say(
        f"feature cache of {n} crops ({backbone.spec.name}, {crops.crop_size} px, grid {h}x{w}, "
        f"C={identity['backbone']['embed_dim']}): features {_human(sizes['features'])} ({dtype}) + "
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

    # Files of another layout (e.g. float32 features after float16 ones) are stale.
    keep = {entry["file"] for entry in layout.values()} | {PROGRESS_NAME}
    for name in set(_FEATURE_FILES.values()) | {WEIGHTS_FILE}:
        if name not in keep:
            (cache_dir / name).unlink(missing_ok=True)
    if completed == 0:
        for entry in layout.values():
            (cache_dir / entry["file"]).unlink(missing_ok=True)
    features, weights = _open_arrays(cache_dir, layout, "r+" if completed else "w+")

    record = {**identity, **layout, "completed": completed, "dtype": dtype, "amp_dtype": _dtype_name(amp_dtype),
              "device": str(device), "batch_size": batch_size, "weights_path": weights_path,
              "prepared_dir": str(Path(prepared_dir).absolute())}
    write_json_atomic(record, progress_path, indent=1)

    order = list(range(completed, n))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    bar = tqdm(total=n, initial=completed, unit="crop", desc=f"feature cache {backbone.spec.name}",
               disable=not progress, dynamic_ncols=True)
    started = time.time()
    try:
        for indices, batch in zip(batches, make_loader(crops, batches, num_workers, device)):
            images = batch["image"].to(device, non_blocking=True)
            with torch.no_grad(), autocast(device, amp_dtype):
                out = backbone(images, with_attention=True)
            neighbour = attention_neighbour_weights(out.attention_scores, (h, w), backbone.num_prefix_tokens,
                                                    sigma, clamp_quantiles=CLAMP_QUANTILES)
            if not torch.isfinite(out.features).all():
                raise FeatureCacheError(f"the backbone gave non-finite features for crops {indices[0]}..{indices[-1]}")
            stored = out.features.float().to(getattr(torch, dtype))
            if not torch.isfinite(stored).all():
                raise FeatureCacheError(
                    f"backbone features of crops {indices[0]}..{indices[-1]} exceed the float16 range (±65504): "
                    "build the cache with --dtype float32"
                )
            start, stop = indices[0], indices[-1] + 1
            features[start:stop] = stored.cpu().numpy()
            weights[start:stop] = neighbour.float().cpu().numpy()
            # Data first, then the marker: a crash between the two only recomputes this batch.
            features.flush()
            weights.flush()
            record["completed"] = stop
            write_json_atomic(record, progress_path, indent=1)
            bar.update(len(indices))
    finally:
        bar.close()
        del features, weights

    record["completed"] = n
    record["build_seconds"] = round(time.time() - started, 3)
    write_json_atomic(record, meta_path, indent=1)  # last: its presence means "complete"
    progress_path.unlink(missing_ok=True)
    return cache_dir


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------- validation


def validate_cache(
    cache_dir: str | Path,
    backbone: Backbone,
    prepared_dir: str | Path,
    sigma: float,
    *,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Check that ``cache_dir`` holds a complete cache for this backbone, σ and prepared set.

    Returns the cache's metadata; raises :class:`FeatureCacheError` saying what differs.
    ``fingerprint`` skips recomputing :func:`backbone_fingerprint` when the caller has it.
    """
    cache_dir = Path(cache_dir)
    meta_path, progress_path = cache_dir / META_NAME, cache_dir / PROGRESS_NAME
    if not meta_path.is_file():
        partial = _read_json(progress_path) if progress_path.is_file() else None
        if partial is not None:
            done, total = partial.get("completed"), _lookup(partial, ("data", "n_crops"))
            raise FeatureCacheError(
                f"feature cache {cache_dir} is incomplete ({done} of {total} crops): run `hpseg cache` again "
                "to finish it (it resumes)"
            )
        raise FeatureCacheError(f"no feature cache in {cache_dir} ({meta_path} not found): build it with `hpseg cache`")
    meta = _read_json(meta_path)
    if meta is None:
        raise FeatureCacheError(f"feature cache {cache_dir}: {meta_path} is unreadable; rebuild with `hpseg cache --overwrite`")
    crops = TrainCrops(prepared_dir, with_augmented=False)
    identity = _identity(backbone, crops, sigma, fingerprint)
    problems = _mismatches(meta, identity)
    if meta.get("format") == CACHE_FORMAT and meta.get("version") != CACHE_VERSION:
        problems = [_OLD_VERSION.get(meta.get("version"), f"format version {meta.get('version')!r}, "
                                     f"this hpseg reads version {CACHE_VERSION}")]
    if not problems:
        if meta.get("completed") != identity["data"]["n_crops"]:
            problems.append(f"completed crops: {meta.get('completed')} of {identity['data']['n_crops']}")
        dtype = _lookup(meta, ("features", "dtype"))
        if dtype not in _FEATURE_FILES or not _files_ok(cache_dir, _layout(identity, dtype)):
            problems.append("data files missing or of the wrong size")
    if problems:
        raise FeatureCacheError(
            f"feature cache {cache_dir} does not fit this run: {'; '.join(problems)}. Rebuild it for this "
            "backbone and data with `hpseg cache ... --overwrite`, point data.feature_cache at another cache, "
            "or train without one: data.feature_cache=off"
        )
    return meta


# ---------------------------------------------------------------------------------- reading


class _CacheReader(Dataset):
    """Items of the cache (+ labels / photometric view from the prepared crops), for a DataLoader.

    The memory maps are opened lazily in whichever process reads (DataLoader workers included).
    """

    def __init__(self, cache_dir: Path, meta: dict[str, Any], crops: TrainCrops | None) -> None:
        self.cache_dir, self.meta, self.crops = cache_dir, meta, crops
        self._arrays: tuple[np.memmap, np.memmap] | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self.meta["data"]["n_crops"])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None, "_pid": -1}

    def arrays(self) -> tuple[np.memmap, np.memmap]:
        if self._arrays is None or self._pid != os.getpid():
            self._arrays = _open_arrays(self.cache_dir, self.meta, "r")
            self._pid = os.getpid()
        return self._arrays

    def __getitem__(self, i: int) -> dict[str, Any]:
        features, weights = self.arrays()
        item: dict[str, Any] = {"features": torch.from_numpy(np.array(features[i]))}
        crops = self.crops
        if crops is None:
            return item
        item["neighbour_weights"] = torch.from_numpy(np.array(weights[i]))
        if crops.with_augmented:
            # The same reading and augmentation as TrainCrops (same draws from the same RNG).
            sample = crops[i]
            item["image_aug"], item["label"] = sample["image_aug"], sample["label"]
        elif crops.has_labels:
            label = read_label(crops.root / "labels" / f"{crops.crops[i]}.png")  # no image decoding
            item["label"] = torch.from_numpy(np.where(label == IGNORE_U8, -1, label).astype(np.int64))
        else:
            item["label"] = torch.full((crops.crop_size, crops.crop_size), -1, dtype=torch.int64)
        return item


class CachedFeatures:
    """Training inputs from a feature cache, with the interface of :class:`~hpseg.training.features.BackboneFeatures`.

    Features are read as stored (float16 by default) and converted to float32 on ``device``.
    Labels come from the prepared crops' label PNGs; the photometric view (``with_augmented``,
    α > 0) is read and augmented exactly as :class:`~hpseg.data.TrainCrops` does, and the
    trainer runs the backbone on it.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        prepared_dir: str | Path,
        *,
        with_augmented: bool,
        device: torch.device,
        num_workers: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.meta = meta if meta is not None else _read_json(self.cache_dir / META_NAME)
        if self.meta is None:
            raise FeatureCacheError(f"no feature cache in {self.cache_dir}: build it with `hpseg cache`")
        self.dataset = TrainCrops(prepared_dir, with_augmented=with_augmented)
        if len(self.dataset) != int(self.meta["data"]["n_crops"]):
            raise FeatureCacheError(
                f"feature cache {self.cache_dir} holds {self.meta['data']['n_crops']} crops, "
                f"{prepared_dir} has {len(self.dataset)}: rebuild it with `hpseg cache --overwrite`"
            )
        self.with_augmented = with_augmented
        self.device, self.num_workers = torch.device(device), num_workers
        self._steps = _CacheReader(self.cache_dir, self.meta, self.dataset)
        self._maps = _CacheReader(self.cache_dir, self.meta, None)

    def __len__(self) -> int:
        return len(self.dataset)

    def steps(self, batches: Sequence[list[int]]) -> Iterator[StepInputs]:
        for batch in make_loader(self._steps, batches, self.num_workers, self.device):
            features = batch["features"].to(self.device, non_blocking=True).float()
            weights = batch["neighbour_weights"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            aug = batch["image_aug"].to(self.device, non_blocking=True) if self.with_augmented else None
            yield StepInputs(features, weights, labels, aug)

    def feature_maps(self, batches: Sequence[list[int]]) -> Iterator[torch.Tensor]:
        """(B, C, h, w) float32 cached features of the given batches (for the reference pools)."""
        for batch in make_loader(self._maps, batches, self.num_workers, self.device):
            yield batch["features"].to(self.device, non_blocking=True).float()


# ---------------------------------------------------------------------------------- choosing


def default_cache_dir(prepared_dir: str | Path, backbone_name: str) -> Path:
    """``<prepared_dir>/feature_cache/<backbone name>``: where ``hpseg cache`` writes by default."""
    return Path(prepared_dir) / "feature_cache" / backbone_name


def _is_off(setting: str | None) -> bool:
    return setting is not None and setting.strip().lower() in _OFF


def resolve_cache_dir(config: Any) -> Path | None:
    """The cache directory a config names: None when ``data.feature_cache`` is ``off``."""
    setting = config.data.feature_cache
    if _is_off(setting):
        return None
    if setting is None or setting.strip().lower() in ("", "auto"):
        return default_cache_dir(config.data.prepared_path(), config.backbone.name)
    return Path(setting)


def open_feature_cache(
    config: Any,
    backbone: Backbone,
    *,
    device: torch.device,
    say: Callable[[str], None] = print,
) -> CachedFeatures | None:
    """The feature source the rule of ``data.feature_cache`` picks (module docstring), or None
    for "compute with the backbone". Raises FeatureCacheError for a cache that is there but
    does not fit, and for an explicitly named cache that is missing."""
    setting = config.data.feature_cache
    cache_dir = resolve_cache_dir(config)
    if cache_dir is None:
        return None
    explicit = setting is not None and setting.strip().lower() not in ("", "auto")
    present = (cache_dir / META_NAME).is_file() or (cache_dir / PROGRESS_NAME).is_file()
    if not present and not explicit:
        say(f"no feature cache at {cache_dir}: the backbone computes the features at every step "
            "(`hpseg cache` builds one)")
        return None
    prepared = config.data.prepared_path()
    meta = validate_cache(cache_dir, backbone, prepared, config.method.sigma)
    say(f"training from the feature cache {cache_dir} ({meta['features']['dtype']} features)")
    return CachedFeatures(cache_dir, prepared, with_augmented=config.method.alpha > 0, device=device,
                          num_workers=config.data.num_workers, meta=meta)
