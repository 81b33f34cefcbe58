"""Reading a feature cache: its validation, the training source it serves, and which cache a run uses."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hpseg.backbones import Backbone
from hpseg.data import TrainCrops
from hpseg.data.transforms import PhotometricInput
from hpseg.training.cache.identity import (
    CACHE_FORMAT,
    CACHE_VERSION,
    FEATURE_FILES,
    META_NAME,
    OLD_VERSIONS,
    PROGRESS_NAME,
    FeatureCacheError,
    cache_identity,
    cache_layout,
    files_ok,
    identity_mismatches,
    lookup,
    open_arrays,
    read_json,
    with_recipe,
)
from hpseg.training.features import CropsSource, StepInputs, augmented_features, make_loader

logger = logging.getLogger(__name__)
_OFF = {"off", "false", "none", "no"}  # `data.feature_cache=off` arrives as "False" (YAML 1.1)


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
    ``fingerprint`` skips recomputing the backbone fingerprint when the caller has it.
    """
    cache_dir = Path(cache_dir)
    meta = _complete_meta(cache_dir)
    identity = cache_identity(backbone, TrainCrops(prepared_dir, with_augmented=False), sigma, fingerprint)
    problems = identity_mismatches(with_recipe(meta), identity)
    if meta.get("format") == CACHE_FORMAT and meta.get("version") != CACHE_VERSION:
        problems = [OLD_VERSIONS.get(meta.get("version"), f"format version {meta.get('version')!r}, "
                                     f"this hpseg reads version {CACHE_VERSION}")]
    if not problems:
        if meta.get("completed") != identity["data"]["n_crops"]:
            problems.append(f"completed crops: {meta.get('completed')} of {identity['data']['n_crops']}")
        dtype = lookup(meta, ("features", "dtype"))
        if dtype not in FEATURE_FILES or not files_ok(cache_dir, cache_layout(identity, dtype)):
            problems.append("data files missing or of the wrong size")
    if problems:
        raise FeatureCacheError(
            f"feature cache {cache_dir} does not fit this run: {'; '.join(problems)}. Rebuild it for this "
            "backbone and data with `hpseg cache ... --overwrite`, point data.feature_cache at another cache, "
            "or train without one: data.feature_cache=off"
        )
    return meta


def _complete_meta(cache_dir: Path) -> dict[str, Any]:
    """The ``meta.json`` of a finished build; FeatureCacheError saying what to run otherwise."""
    meta_path, progress_path = cache_dir / META_NAME, cache_dir / PROGRESS_NAME
    if not meta_path.is_file():
        partial = read_json(progress_path) if progress_path.is_file() else None
        if partial is not None:
            done, total = partial.get("completed"), lookup(partial, ("data", "n_crops"))
            raise FeatureCacheError(
                f"feature cache {cache_dir} is incomplete ({done} of {total} crops): run `hpseg cache` again "
                "to finish it (it resumes)"
            )
        raise FeatureCacheError(f"no feature cache in {cache_dir} ({meta_path} not found): build it with `hpseg cache`")
    meta = read_json(meta_path)
    if meta is None:
        raise FeatureCacheError(f"feature cache {cache_dir}: {meta_path} is unreadable; rebuild with `hpseg cache --overwrite`")
    return meta


class _CacheItems(Dataset):
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
            self._arrays = open_arrays(self.cache_dir, self.meta, "r")
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
        else:
            item["label"] = crops.label(i)  # no image decoding
        return item


class CachedFeatures(CropsSource):
    """Training inputs from a feature cache; a :class:`~hpseg.training.features.FeatureSource`.

    Features are read as stored (float16 by default) and converted to float32 on ``device``.
    Labels come from the prepared crops' label PNGs; the photometric view (``with_augmented``,
    α > 0) is read and augmented exactly as :class:`~hpseg.data.TrainCrops` does, and
    ``backbone`` computes its features.
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
        backbone: Backbone | None = None,
        amp_dtype: torch.dtype | None = None,
        photometric_input: PhotometricInput = "normalized",
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.meta = meta if meta is not None else read_json(self.cache_dir / META_NAME)
        if self.meta is None:
            raise FeatureCacheError(f"no feature cache in {self.cache_dir}: build it with `hpseg cache`")
        if with_augmented and backbone is None:
            raise ValueError("with_augmented=True needs the backbone for the photometric view's features")
        self.dataset = TrainCrops(prepared_dir, with_augmented=with_augmented, photometric_input=photometric_input)
        if len(self.dataset) != int(self.meta["data"]["n_crops"]):
            raise FeatureCacheError(
                f"feature cache {self.cache_dir} holds {self.meta['data']['n_crops']} crops, "
                f"{prepared_dir} has {len(self.dataset)}: rebuild it with `hpseg cache --overwrite`"
            )
        self.with_augmented, self.backbone, self.amp_dtype = with_augmented, backbone, amp_dtype
        self.device, self.num_workers = torch.device(device), num_workers
        self._steps = _CacheItems(self.cache_dir, self.meta, self.dataset)
        self._maps = _CacheItems(self.cache_dir, self.meta, None)

    def steps(self, batches: Sequence[list[int]], seeds: Sequence[int]) -> Iterator[StepInputs]:
        for batch in self.loader_batches(make_loader(self._steps, batches, self.num_workers, self.device, seeds)):
            features = batch["features"].to(self.device, non_blocking=True).float()
            weights = batch["neighbour_weights"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            aug = None
            if self.with_augmented:
                assert self.backbone is not None
                aug = augmented_features(self.backbone, batch["image_aug"], self.device, self.amp_dtype)
            yield StepInputs(features, weights, labels, aug)

    def feature_maps(self, batches: Sequence[list[int]]) -> Iterator[torch.Tensor]:
        """(B, C, h, w) float32 cached features of the given batches (for the threshold pools)."""
        for batch in make_loader(self._maps, batches, self.num_workers, self.device):
            yield batch["features"].to(self.device, non_blocking=True).float()


def default_cache_dir(prepared_dir: str | Path, backbone_name: str) -> Path:
    """``<prepared_dir>/feature_cache/<backbone name>``: where ``hpseg cache`` writes by default."""
    return Path(prepared_dir) / "feature_cache" / backbone_name


def _is_auto(setting: str | None) -> bool:
    return setting is None or setting.strip().lower() in ("", "auto")


def cache_dir_for(setting: str | None, prepared_dir: str | Path, backbone_name: str) -> Path | None:
    """The cache directory ``data.feature_cache = setting`` names: None when it is ``off``."""
    if setting is not None and setting.strip().lower() in _OFF:
        return None
    return default_cache_dir(prepared_dir, backbone_name) if _is_auto(setting) else Path(setting)


def open_feature_cache(
    setting: str | None,
    prepared_dir: str | Path,
    backbone: Backbone,
    *,
    sigma: float,
    with_augmented: bool,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    photometric_input: PhotometricInput = "normalized",
) -> CachedFeatures | None:
    """The feature source the rule of ``data.feature_cache = setting`` picks (package docstring),
    or None for "compute with the backbone". Raises FeatureCacheError for a cache that is there
    but does not fit, and for an explicitly named cache that is missing."""
    cache_dir = cache_dir_for(setting, prepared_dir, backbone.spec.name)
    if cache_dir is None:
        return None
    present = (cache_dir / META_NAME).is_file() or (cache_dir / PROGRESS_NAME).is_file()
    if not present and _is_auto(setting):
        logger.info(f"no feature cache at {cache_dir}: the backbone computes the features at every step "
                    "(`hpseg cache` builds one)")
        return None
    meta = validate_cache(cache_dir, backbone, prepared_dir, sigma)
    logger.info(f"training from the feature cache {cache_dir} ({meta['features']['dtype']} features)")
    return CachedFeatures(cache_dir, prepared_dir, with_augmented=with_augmented, device=device,
                          num_workers=num_workers, meta=meta, backbone=backbone, amp_dtype=amp_dtype,
                          photometric_input=photometric_input)
