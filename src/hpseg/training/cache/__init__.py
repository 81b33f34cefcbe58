"""Feature cache: the frozen backbone's outputs on the training crops, computed once.

The backbone is frozen and the main training view is the prepared crop itself (spec §7: no
random geometric augmentation), so its patch features ``f`` and its LHP neighbour weights
(spec §4, after the percentile clamp, softmax × σ, below-mean cut and 3×3 restriction) are the
same at every epoch. :func:`build_feature_cache` (``hpseg cache``, ``builder``) computes them
once; :class:`CachedFeatures` (``reader``) then serves training steps from disk as a
:class:`hpseg.training.features.FeatureSource`, like ``BackboneFeatures``. ``identity`` says
what a cache is (what it was computed from, its files) and so when it may be used. Only the
photometric view of the consistency loss still needs the backbone during training (and nothing
does with α = 0); validation always runs the backbone on the validation images.

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

from pathlib import Path
from typing import Any

from hpseg.training.cache.builder import build_feature_cache
from hpseg.training.cache.identity import (
    CACHE_FORMAT,
    CACHE_VERSION,
    FeatureCacheError,
    backbone_fingerprint,
    cache_size,
)
from hpseg.training.cache.reader import (
    CachedFeatures,
    cache_dir_for,
    default_cache_dir,
    open_feature_cache,
    validate_cache,
)

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "CachedFeatures",
    "FeatureCacheError",
    "backbone_fingerprint",
    "build_feature_cache",
    "cache_dir_for",
    "cache_size",
    "default_cache_dir",
    "open_feature_cache",
    "resolve_cache_dir",
    "validate_cache",
]


def resolve_cache_dir(config: Any) -> Path | None:
    """:func:`cache_dir_for` of a run config (``hpseg cache`` calls this); None when ``off``."""
    return cache_dir_for(config.data.feature_cache, config.data.prepared_path(), config.backbone.name)
