"""The threshold pools of a run (spec §2, there called "reference pools"): which crops a pool pass
reads, and the one function that fills a pool from them, on one process or under ``torchrun``.

Each pool holds one random patch feature per crop of a shuffled pass; a patch is a global hidden
positive of an anchor only if it is more similar to the anchor than the anchor's best match in
the pool (``method.positives.pool_thresholds``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from hpseg.method.pools import fill_pool, picked_patches
from hpseg.runtime import DistributedContext
from hpseg.training.distributed import gather_uneven, share_bounds


@dataclass
class ThresholdPools:
    """The two pools of spec §2: (P, C) task-agnostic, (P, D) task-specific, L2-normalised rows."""

    agnostic: torch.Tensor
    specific: torch.Tensor


def pool_batches(n_crops: int, batch_size: int, pool_size: int, generator: torch.Generator,
                 world_size: int = 1) -> list[list[int]]:
    """Shuffled global batches of the crops a pool pass reads: one patch per crop fills the pool
    after ``pool_size`` crops, so only those are listed (a loader's workers read no more); under
    torchrun a tail batch of fewer crops than ranks is left out."""
    order = torch.randperm(n_crops, generator=generator).tolist()
    needed = -(-pool_size // batch_size) * batch_size
    batches = [order[i : i + batch_size] for i in range(0, min(n_crops, needed), batch_size)]
    return [batch for batch in batches if len(batch) >= world_size]


def collect_pool(
    shares: Iterable[torch.Tensor], batch_sizes: list[int], pool_size: int, generator: torch.Generator,
    context: DistributedContext | None = None,
) -> torch.Tensor:
    """A pool from one patch per crop of global batches of ``batch_sizes[k]`` crops each.

    ``shares`` yields this process's (b_r, C, h, w) maps of each batch: the whole batch on one
    process, this rank's ``distributed.rank_share`` of it under torchrun (at least one crop per
    rank). The generator picks one patch per crop of the whole batch, as one process would, so
    every rank draws the same; the picked rows are gathered. Consumed only until the pool is full.

    Returns:
        (P, C) float32 L2-normalised rows, P = min(pool_size, crops seen), the same on every rank.
    """
    context = context or DistributedContext()
    world = context.world_size

    def picked() -> Iterator[torch.Tensor]:
        for maps, size in zip(shares, batch_sizes):
            picks = torch.randint(maps.shape[-2] * maps.shape[-1], (size,), generator=generator)
            bounds = [share_bounds(size, rank, world) for rank in range(world)]
            own = picked_patches(maps, picks[bounds[context.rank]])
            yield gather_uneven(own.float(), [b.stop - b.start for b in bounds], context)

    return fill_pool(picked(), pool_size)
