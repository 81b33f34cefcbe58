"""The validation set's backbone features, computed once per run (``data.val_feature_cache``).

The backbone is frozen and the validation view is fixed (resize + centre crop, spec §8), so the
features f of the validation images do not change during training. They are computed at the
first validation, stored as float16 with the labels (int16), and every validation then runs
only the head, the probes and the metrics (:func:`hpseg.evaluation.protocol.evaluate_features`).
The metrics equal the backbone path's up to f's float16 rounding (relative 2**-11, as the
training feature cache; tests/test_validation_cache.py).

Where they are kept (``data.val_feature_cache``):

* ``auto`` (default): in memory on the training device when they take at most a quarter of its
  free memory (RAM on the CPU), else ``disk``;
* ``memory``: on the training device, whatever their size;
* ``disk``: memory-mapped files in ``<prepared_dir>/feature_cache/<backbone>-val<size>[-rank<r>of<w>]/``
  beside the training feature cache (``features.f16``, ``labels.i16``, ``meta.json`` written
  last), reused by later runs while their identity matches — the same checks as the training
  cache (:mod:`hpseg.training.cache.identity`: backbone name, weights fingerprint, patch size,
  width, prefix tokens; validation size and grid; dataset, split, the images evaluated, a hash
  of their names and file sizes and of the bytes of 8 of them) — and rebuilt when it does not;
* ``off``: the backbone runs on every validation image at every validation (the path before).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from hpseg.backbones import Backbone
from hpseg.config import val_feature_cache_setting
from hpseg.data import ValCrops
from hpseg.files import write_json_atomic
from hpseg.runtime import autocast
from hpseg.training.cache.identity import (
    FORMAT_AND_BACKBONE_CHECKED,
    backbone_identity,
    files_ok,
    identity_mismatches,
    read_json,
)

logger = logging.getLogger(__name__)

FORMAT = "hpseg-validation-features"
VERSION = 1
_SAMPLED_IMAGES = 8
_CHECKED = [
    *FORMAT_AND_BACKBONE_CHECKED,
    (("val_size",), "validation size"),
    (("interpolation",), "image interpolation"),
    (("grid",), "patch grid"),
    (("data", "dataset"), "dataset"),
    (("data", "split"), "split"),
    (("data", "n_images"), "number of validation images"),
    (("data", "images_sha256"), "image names and sizes (hash)"),
    (("data", "images_sample_sha256"), "image bytes (hash of a sample)"),
]


@dataclass
class ValidationFeatures:
    """f of the validation images and their labels, in memory or memory-mapped.

    Shapes: features (N, C, h, w) float16; labels (N, S, S) int16 (-1 = ignore).
    """

    features: torch.Tensor | np.memmap
    labels: torch.Tensor | np.memmap
    where: str  # "memory" or the cache directory

    def batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, None]]:
        """(B, C, h, w) float32 features, (B, S, S) int64 labels on ``device``, and no CRF images."""
        for start in range(0, len(self.features), batch_size):
            end = start + batch_size
            yield (_tensor(self.features[start:end]).to(device).float(),
                   _tensor(self.labels[start:end]).to(device).long(), None)


def _tensor(rows: torch.Tensor | np.ndarray) -> torch.Tensor:
    return rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(rows))


def validation_identity(backbone: Backbone, dataset: ValCrops, indices: list[int]) -> dict[str, Any]:
    """The identity a validation feature cache of ``backbone`` on ``dataset[indices]`` records."""
    raw, size = dataset.raw, dataset.size
    names = hashlib.sha256()
    for i in indices:
        label = raw.label_path_of(i)
        names.update(f"{raw.key_of(i)}|{raw.path_of(i).stat().st_size}|"
                     f"{label.stat().st_size if label else None}\n".encode())
    sample = hashlib.sha256()
    n = len(indices)
    for k in sorted({round(j * (n - 1) / (_SAMPLED_IMAGES - 1)) for j in range(_SAMPLED_IMAGES)} if n else set()):
        sample.update(raw.path_of(indices[k]).read_bytes())
    return {
        "format": FORMAT, "version": VERSION,
        "backbone": backbone_identity(backbone),
        "val_size": size, "interpolation": dataset.image_interpolation,
        "grid": list(backbone.grid_size(size, size)),
        "data": {"dataset": raw.name, "split": raw.split, "n_images": n, "images_sha256": names.hexdigest(),
                 "images_sample_sha256": sample.hexdigest()},
    }


def _layout(identity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    n, c = identity["data"]["n_images"], identity["backbone"]["embed_dim"]
    h, w = identity["grid"]
    s = identity["val_size"]
    return {"features": {"file": "features.f16", "dtype": "float16", "shape": [n, c, h, w]},
            "labels": {"file": "labels.i16", "dtype": "int16", "shape": [n, s, s]}}


def _compute(backbone: Backbone, dataset: ValCrops, indices: list[int], device: torch.device,
             amp_dtype: torch.dtype | None, num_workers: int, batch_size: int,
             out: tuple[Any, Any]) -> None:
    """Fill ``out`` = (features (N, C, h, w), labels (N, S, S)) with the backbone's f and the labels."""
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        pin_memory=device.type == "cuda",
                        # its own generator: building the features must not draw from the global RNG
                        # (a resumed run builds them at another step than an uninterrupted one)
                        generator=torch.Generator().manual_seed(0))
    start = 0
    for batch in loader:
        with torch.no_grad(), autocast(device, amp_dtype):
            features = backbone(batch["image"].to(device, non_blocking=True)).features
        end = start + features.shape[0]
        if isinstance(out[0], torch.Tensor):
            out[0][start:end] = features.to(torch.float16)
            out[1][start:end] = batch["label"].to(device, torch.int16)
        else:
            out[0][start:end] = features.to(torch.float16).cpu().numpy()
            out[1][start:end] = batch["label"].to(torch.int16).numpy()
        start = end


def _fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` take at most a quarter of the device's free memory (RAM on the CPU)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return nbytes <= free // 4


def validation_cache_dir(prepared_dir: str | Path, backbone_name: str, val_size: int, rank: int = 0,
                         world_size: int = 1) -> Path:
    """``<prepared_dir>/feature_cache/<backbone>-val<size>[-rank<r>of<w>]``: the ``disk`` location."""
    suffix = f"-rank{rank}of{world_size}" if world_size > 1 else ""
    return Path(prepared_dir) / "feature_cache" / f"{backbone_name}-val{val_size}{suffix}"


def open_disk_cache(cache_dir: Path, identity: dict[str, Any]) -> ValidationFeatures | None:
    """The cache in ``cache_dir`` when it is complete and of ``identity``; None otherwise (logged)."""
    meta = read_json(cache_dir / "meta.json")
    if meta is None:
        return None
    problems = identity_mismatches(meta, identity, _CHECKED)
    layout = _layout(identity)
    if not problems and not files_ok(cache_dir, layout):
        problems = ["data files missing or of the wrong size"]
    if problems:
        logger.info(f"validation feature cache {cache_dir} is stale ({'; '.join(problems)}): rebuilding it")
        return None
    arrays = [np.memmap(cache_dir / e["file"], dtype=e["dtype"], mode="r", shape=tuple(e["shape"]))
              for e in layout.values()]
    return ValidationFeatures(arrays[0], arrays[1], str(cache_dir))


def build_disk_cache(cache_dir: Path, identity: dict[str, Any], compute: Any) -> ValidationFeatures:
    """Write a fresh cache of ``identity`` into ``cache_dir`` (``compute(out)`` fills the arrays);
    ``meta.json`` last, so an interrupted build is never taken for a complete one."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    layout = _layout(identity)
    arrays = [np.memmap(cache_dir / e["file"], dtype=e["dtype"], mode="w+", shape=tuple(e["shape"]))
              for e in layout.values()]
    compute((arrays[0], arrays[1]))
    for array in arrays:
        array.flush()
    write_json_atomic({**identity, "arrays": layout}, cache_dir / "meta.json")
    return ValidationFeatures(arrays[0], arrays[1], str(cache_dir))


def validation_features(
    setting: str,
    dataset: ValCrops,
    indices: list[int],
    backbone: Backbone,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    cache_dir: Path,
    num_workers: int = 0,
    batch_size: int = 16,
) -> ValidationFeatures | None:
    """The validation features ``setting`` (module docstring) asks for; None for ``off``."""
    setting = val_feature_cache_setting(setting)
    if setting == "off":
        return None
    identity = validation_identity(backbone, dataset, indices)
    layout = _layout(identity)
    nbytes = sum(int(np.prod(e["shape"])) * np.dtype(e["dtype"]).itemsize for e in layout.values())
    in_memory = setting == "memory" or (setting == "auto" and _fits_in_memory(nbytes, device))

    def compute(out: tuple[Any, Any]) -> None:
        _compute(backbone, dataset, indices, device, amp_dtype, num_workers, batch_size, out)

    if in_memory:
        features = torch.empty(layout["features"]["shape"], dtype=torch.float16, device=device)
        labels = torch.empty(layout["labels"]["shape"], dtype=torch.int16, device=device)
        compute((features, labels))
        return ValidationFeatures(features, labels, "memory")
    return open_disk_cache(cache_dir, identity) or build_disk_cache(cache_dir, identity, compute)
