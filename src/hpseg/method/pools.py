"""Reference pools (spec §2): one random patch feature per image of a shuffled pass.

The pools set the data-driven thresholds of global hidden positives: a patch j is a positive
of anchor i only if it is more similar to i than i's best match among these random patches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def one_patch_per_image(feature_maps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, h, w) -> (B, C): the feature of one patch per image, chosen uniformly at random."""
    batch, channels, height, width = feature_maps.shape
    picks = torch.randint(height * width, (batch,), generator=generator).to(feature_maps.device)
    return feature_maps.reshape(batch, channels, height * width)[torch.arange(batch, device=picks.device), :, picks]


def collect_pool(
    feature_batches: Iterable[torch.Tensor], pool_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill a pool from feature maps of a shuffled pass over the training set.

    Args:
        feature_batches: iterable of (B, C, h, w) maps (backbone f or EMA-head s'); consumed
            only until the pool is full.
        pool_size: rows wanted; a dataset with fewer images gives a smaller pool.
    Returns:
        (P, C) float32 L2-normalised rows, P = min(pool_size, images seen).
    """
    return fill_pool((one_patch_per_image(maps, generator) for maps in feature_batches), pool_size)


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
        raise ValueError("cannot build a reference pool from an empty dataset")
    return F.normalize(torch.cat(rows), dim=1)
