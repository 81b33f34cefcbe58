"""Threshold pools (spec §2, "reference pools"): one random patch feature per image of a shuffled pass.

The pools set the data-driven thresholds of global hidden positives: a patch j is a positive
of anchor i only if it is more similar to i than i's best match among these random patches.
Which patches are picked, and how a run fills its pools, is ``hpseg.training.pools``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def picked_patches(feature_maps: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """The feature of patch ``picks[b]`` (row-major over h x w) of each image b: (B, C, h, w), (B,) -> (B, C)."""
    batch, channels, height, width = feature_maps.shape
    rows = torch.arange(batch, device=feature_maps.device)
    return feature_maps.reshape(batch, channels, height * width)[rows, :, picks.to(feature_maps.device)]


def fill_pool(picked_batches: Iterable[torch.Tensor], pool_size: int) -> torch.Tensor:
    """(P, C) float32 L2-normalised pool from batches of picked (b, C) rows, consumed until it is full."""
    rows: list[torch.Tensor] = []
    count = 0
    for picked in picked_batches:
        picked = picked[: pool_size - count]
        rows.append(picked.float())
        count += picked.shape[0]
        if count >= pool_size:
            break
    if not rows:
        raise ValueError("cannot build a threshold pool from an empty dataset")
    return F.normalize(torch.cat(rows), dim=1)
