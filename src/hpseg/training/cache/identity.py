"""What a feature cache is: its identity (backbone, data, LHP settings), its file layout and sizes.

A cache is valid for a run when the identity recorded in its ``meta.json`` equals the identity
computed now (:func:`identity_mismatches`) and its files have the sizes its layout implies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpseg.backbones import Backbone
from hpseg.data import TrainCrops
from hpseg.errors import HpsegError
from hpseg.training.features import CLAMP_QUANTILES

CACHE_FORMAT = "hpseg-feature-cache"
#: 2: LHP weights from the pre-softmax attention scores and DINO's own position interpolation
#: (version 1 caches hold weights computed from the probabilities: wrong, refused).
CACHE_VERSION = 2
META_NAME = "meta.json"
PROGRESS_NAME = "progress.json"
WEIGHTS_FILE = "neighbour_weights.f32"
FEATURE_FILES = {"float16": "features.f16", "float32": "features.f32"}
_SAMPLED_IMAGES = 8

#: Why a cache of an older format version is refused.
OLD_VERSIONS = {
    1: ("it was built by an older hpseg (format version 1) whose LHP neighbour weights came from the "
        "attention probabilities instead of the pre-softmax scores, and whose DINO features at grids "
        "other than the native one used timm's position interpolation instead of DINO's"),
}


class FeatureCacheError(HpsegError, ValueError):
    """A feature cache that cannot be built or used; the message names the directory and the fix."""


def backbone_identity(backbone: Backbone, fingerprint: str | None = None) -> dict[str, Any]:
    """What identifies a backbone's features: name, weights fingerprint, patch size, width, prefix tokens."""
    return {
        "name": backbone.spec.name,
        "fingerprint": fingerprint or backbone_fingerprint(backbone),
        "patch_size": backbone.patch_size,
        "embed_dim": backbone.embed_dim,
        "num_prefix_tokens": backbone.num_prefix_tokens,
    }


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
        "crop_rule": manifest["crop_rule"],
        "crop_format": manifest["crop_format"],
        "stored_size": manifest["stored_size"],
        "n_crops": n,
        "crops_sha256": names,
        "images_sample_sha256": sample.hexdigest(),
    }


def cache_identity(backbone: Backbone, crops: TrainCrops, sigma: float, fingerprint: str | None = None) -> dict[str, Any]:
    """The identity a cache of ``backbone``'s outputs on ``crops`` with LHP σ = ``sigma`` records."""
    size = crops.crop_size
    h, w = backbone.grid_size(size, size)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "backbone": backbone_identity(backbone, fingerprint),
        "crop_size": size,
        "grid": [h, w],
        "lhp": {"sigma": float(sigma), "clamp_quantiles": list(CLAMP_QUANTILES)},
        "data": _dataset_identity(crops),
    }


#: The fields of :func:`backbone_identity` (under "backbone") with the format, as every cache checks them.
FORMAT_AND_BACKBONE_CHECKED = [
    (("format",), "format"),
    (("version",), "format version"),
    (("backbone", "name"), "backbone"),
    (("backbone", "fingerprint"), "backbone weights (fingerprint)"),
    (("backbone", "patch_size"), "patch size"),
    (("backbone", "embed_dim"), "feature width C"),
    (("backbone", "num_prefix_tokens"), "prefix tokens"),
]
_CHECKED = [
    *FORMAT_AND_BACKBONE_CHECKED,
    (("crop_size",), "crop size"),
    (("grid",), "patch grid"),
    (("lhp", "sigma"), "LHP sigma"),
    (("lhp", "clamp_quantiles"), "LHP clamp percentiles"),
    (("data", "dataset"), "dataset"),
    (("data", "split"), "split"),
    (("data", "crop_rule"), "crop rule"),
    (("data", "crop_format"), "crop image format"),
    (("data", "stored_size"), "stored crop size"),
    (("data", "n_crops"), "number of training crops"),
    (("data", "crops_sha256"), "crop names (hash)"),
    (("data", "images_sample_sha256"), "crop image bytes (hash of a sample)"),
]


def with_recipe(meta: dict[str, Any]) -> dict[str, Any]:
    """A cache's record with the crop recipe filled in for caches built before it was recorded:
    they were all built on five PNG crops stored at the crop size."""
    data = meta.get("data")
    if not isinstance(data, dict) or "crop_rule" in data:
        return meta
    old = {"crop_rule": "five", "crop_format": "png", "stored_size": meta.get("crop_size")}
    return {**meta, "data": {**old, **data}}


def lookup(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """``record[k0][k1]...``, or None where a key is missing."""
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def identity_mismatches(found: dict[str, Any], wanted: dict[str, Any],
                        checked: list[tuple[tuple[str, ...], str]] | None = None) -> list[str]:
    """One line per identity field (``checked``: key path and label; default the training
    cache's fields) that differs between a cache's record and the wanted identity."""
    out = []
    for keys, label in checked if checked is not None else _CHECKED:
        have, want = lookup(found, keys), lookup(wanted, keys)
        if have != want:
            out.append(f"{label}: {_short(have)} in the cache, {_short(want)} now")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "...'"


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


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def cache_layout(identity: dict[str, Any], dtype: str) -> dict[str, Any]:
    """File name, dtype and shape of the two arrays of a cache of ``identity``."""
    n = identity["data"]["n_crops"]
    c = identity["backbone"]["embed_dim"]
    h, w = identity["grid"]
    return {
        "features": {"file": FEATURE_FILES[dtype], "dtype": dtype, "shape": [n, c, h, w], "layout": "NCHW"},
        "neighbour_weights": {"file": WEIGHTS_FILE, "dtype": "float32", "shape": [n, h * w, 9],
                              "layout": "N,hw,9 (neighbour k = NEIGHBOUR_OFFSETS[k])"},
    }


def _expected_bytes(entry: dict[str, Any]) -> int:
    return int(np.prod(entry["shape"])) * np.dtype(entry["dtype"]).itemsize


def files_ok(cache_dir: Path, layout: dict[str, Any]) -> bool:
    """Whether both array files exist with the sizes ``layout`` implies."""
    for entry in layout.values():
        path = cache_dir / entry["file"]
        if not path.is_file() or path.stat().st_size != _expected_bytes(entry):
            return False
    return True


def open_arrays(cache_dir: Path, layout: dict[str, Any], mode: str) -> tuple[np.memmap, np.memmap]:
    """The (features, neighbour weights) memory maps of a cache."""
    arrays = []
    for key in ("features", "neighbour_weights"):
        entry = layout[key]
        arrays.append(np.memmap(cache_dir / entry["file"], dtype=entry["dtype"], mode=mode, shape=tuple(entry["shape"])))
    return arrays[0], arrays[1]
