"""Where a training step's backbone outputs come from.

:class:`BackboneFeatures` runs the frozen backbone on each batch of training crops; the
feature cache (``hpseg.training.cache``) offers the same interface from precomputed files. The training
loop only sees :class:`StepInputs`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from hpseg.backbones import Backbone
from hpseg.data import TrainCrops
from hpseg.method.local_positives import attention_neighbour_weights
from hpseg.runtime import autocast


@dataclass
class StepInputs:
    """One training batch, on the training device.

    Shapes: features (B, C, h, w) task-agnostic f; neighbour_weights (B, h*w, 9) LHP weights;
    labels (B, H, W) int64 (-1 = ignore); images_aug (B, 3, H, W) photometric view or None.
    """

    features: torch.Tensor
    neighbour_weights: torch.Tensor
    labels: torch.Tensor
    images_aug: torch.Tensor | None


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The shuffled batches of an epoch: a pure function of (seed, epoch), so a resumed run
    replays exactly the order an uninterrupted one would have used. Incomplete batches are dropped;
    with several ranks each takes every world_size-th batch."""
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    n_batches = n_items // batch_size
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    usable = len(batches) // world_size * world_size
    return batches[rank:usable:world_size]


def make_loader(dataset: Dataset, batches: Sequence[list[int]], num_workers: int, device: torch.device) -> DataLoader:
    # A loader of its own generator: creating its iterator must not draw from the global RNG,
    # or a resumed run would see different dropout masks than an uninterrupted one.
    seed = hash(tuple(batches[0])) if batches else 0
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed & 0x7FFFFFFF),
    )


class BackboneFeatures:
    """Computes f and the LHP neighbour weights with the frozen backbone, batch by batch."""

    def __init__(
        self,
        backbone: Backbone,
        prepared_dir: str,
        *,
        with_augmented: bool,
        sigma: float,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        num_workers: int = 0,
    ) -> None:
        self.backbone = backbone
        self.dataset = TrainCrops(prepared_dir, with_augmented=with_augmented)
        # The pool passes need no photometric view: a second reader skips that work.
        self.plain_dataset: Dataset = TrainCrops(prepared_dir, with_augmented=False) if with_augmented else self.dataset
        self.with_augmented = with_augmented
        self.sigma, self.device, self.amp_dtype, self.num_workers = sigma, device, amp_dtype, num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def steps(self, batches: Sequence[list[int]]) -> Iterator[StepInputs]:
        for batch in make_loader(self.dataset, batches, self.num_workers, self.device):
            images = batch["image"].to(self.device, non_blocking=True)
            with autocast(self.device, self.amp_dtype):
                out = self.backbone(images, with_attention=True)
            grid = (out.features.shape[-2], out.features.shape[-1])
            # LHP reads the pre-softmax scores, as the reference (spec §4), not the probabilities.
            weights = attention_neighbour_weights(out.attention_scores, grid, self.backbone.num_prefix_tokens,
                                                  self.sigma)
            aug = batch["image_aug"].to(self.device, non_blocking=True) if self.with_augmented else None
            yield StepInputs(out.features, weights, batch["label"].to(self.device, non_blocking=True), aug)

    def feature_maps(self, batches: Sequence[list[int]]) -> Iterator[torch.Tensor]:
        """(B, C, h, w) backbone features of the given batches (for the reference pools)."""
        for batch in make_loader(self.plain_dataset, batches, self.num_workers, self.device):
            with autocast(self.device, self.amp_dtype):
                yield self.backbone(batch["image"].to(self.device, non_blocking=True)).features
