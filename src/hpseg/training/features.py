"""Where a training step's backbone outputs come from.

Every source of training inputs satisfies :class:`FeatureSource`: :class:`BackboneFeatures`
runs the frozen backbone on each batch of training crops; the feature cache
(``hpseg.training.cache``) serves the same from precomputed files. The training loop only sees
:class:`StepInputs`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from hpseg.backbones import Backbone, BackboneOutput
from hpseg.data import TrainCrops
from hpseg.data.transforms import PhotometricInput
from hpseg.method.local_positives import attention_neighbour_weights
from hpseg.runtime import autocast
from hpseg.training.timers import PhaseTimers, timed_iteration

CLAMP_QUANTILES = (0.1, 0.9)  # the defaults of attention_neighbour_weights (spec §4 step 2)


@dataclass
class StepInputs:
    """One training batch, on the training device.

    Shapes: features (B, C, h, w) task-agnostic f; neighbour_weights (B, h*w, 9) LHP weights;
    labels (B, H, W) int64 (-1 = ignore); features_aug (B, C, h, w) backbone features of the
    photometric view (consistency loss), or None when α = 0.
    """

    features: torch.Tensor
    neighbour_weights: torch.Tensor
    labels: torch.Tensor
    features_aug: torch.Tensor | None


class FeatureSource(Protocol):
    """What the trainer reads training inputs from (the backbone, or the feature cache)."""

    #: The run's timers, set by the trainer: a source counts its waits on its loader as ``loader_wait``.
    timers: PhaseTimers | None

    @property
    def class_names(self) -> list[str]:
        """Names of the classes of the training crops' labels."""
        ...

    @property
    def has_labels(self) -> bool:
        """Whether the training crops carry labels (then their classes must be ``method.n_classes``)."""
        ...

    def __len__(self) -> int:
        """Number of training crops."""
        ...

    def steps(self, batches: Sequence[list[int]], seeds: Sequence[int]) -> Iterator[StepInputs]:
        """The inputs of one step per batch of crop indices; ``seeds[k]`` seeds batch k's augmentation."""
        ...

    def feature_maps(self, batches: Sequence[list[int]]) -> Iterator[torch.Tensor]:
        """(B, C, h, w) backbone features of the given batches (for the threshold pools)."""
        ...


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of an epoch: a pure function of (seed, epoch), so a resumed run
    replays exactly the order an uninterrupted one would have used, and a job of several ranks
    (each reading its share of every batch) the order of one process. Incomplete batches are dropped."""
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    n_batches = n_items // batch_size
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


def batch_seeds(seed: int, epoch: int, n_batches: int) -> list[int]:
    """The augmentation seed of every batch of an epoch: a pure function of (seed, epoch), so a
    loader started mid-epoch (resume) draws what an uninterrupted one would have drawn."""
    generator = torch.Generator().manual_seed((seed * 7919 + epoch) * 1009 + 1)
    return torch.randint(2**31 - 1, (n_batches,), generator=generator).tolist()


class _SeededItems(Dataset):
    """Item ``(i, seed)`` is ``dataset[i]`` read with torch's RNG seeded by ``seed``.

    The photometric augmentation draws from torch's global RNG; seeding it per item makes a
    batch's draws independent of the worker that reads it and of what that worker read before
    (with workers, a per-worker seed would depend on where the loader started). ``fork_rng``
    leaves the caller's RNG untouched when there are no workers.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def make_loader(dataset: Dataset, batches: Sequence[list[int]], num_workers: int, device: torch.device,
                seeds: Sequence[int] | None = None) -> DataLoader:
    """A loader of the given batches; with ``seeds``, the read of crop i in batch k is seeded by
    ``seeds[k]`` and i (not by i's place in the batch: a rank reading its share of a global batch
    draws what one process reading all of it would)."""
    if seeds is not None:
        dataset = _SeededItems(dataset)
        batches = [[(index, seed * 65_537 + index) for index in batch] for batch, seed in zip(batches, seeds)]
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # A generator of its own: creating the iterator must not draw from the global RNG, or a
        # resumed run would see different dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


def neighbour_weights(output: BackboneOutput, backbone: Backbone, sigma: float) -> torch.Tensor:
    """(B, h*w, 9) LHP weights (spec §4) of a backbone output computed ``with_attention``."""
    grid = (output.features.shape[-2], output.features.shape[-1])
    # LHP reads the pre-softmax scores, as the reference (spec §4), not the probabilities.
    return attention_neighbour_weights(output.attention_scores, grid, backbone.num_prefix_tokens, sigma,
                                       clamp_quantiles=CLAMP_QUANTILES)


def augmented_features(backbone: Backbone, images_aug: torch.Tensor, device: torch.device,
                       amp_dtype: torch.dtype | None) -> torch.Tensor:
    """(B, C, h, w) float32 backbone features of the photometric view (B, 3, H, W)."""
    with torch.no_grad(), autocast(device, amp_dtype):
        return backbone(images_aug.to(device, non_blocking=True)).features.float()


class CropsSource:
    """The part of a feature source that the prepared training crops (``dataset``) answer."""

    dataset: TrainCrops
    #: The run's timers (set by the trainer): the wait on the loader is counted as ``loader_wait``.
    timers: PhaseTimers | None = None

    def loader_batches(self, loader: DataLoader) -> Iterator[dict[str, Any]]:
        """The loader's batches, each wait timed as ``loader_wait`` when ``timers`` is set."""
        return timed_iteration(loader, self.timers, "loader_wait")

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def has_labels(self) -> bool:
        return self.dataset.has_labels

    def __len__(self) -> int:
        return len(self.dataset)


class BackboneFeatures(CropsSource):
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
        photometric_input: PhotometricInput = "normalized",
    ) -> None:
        self.backbone = backbone
        self.dataset = TrainCrops(prepared_dir, with_augmented=with_augmented, photometric_input=photometric_input)
        # The pool passes need no photometric view: a second reader skips that work.
        self.plain_dataset: Dataset = TrainCrops(prepared_dir, with_augmented=False) if with_augmented else self.dataset
        self.with_augmented = with_augmented
        self.sigma, self.device, self.amp_dtype, self.num_workers = sigma, device, amp_dtype, num_workers

    def steps(self, batches: Sequence[list[int]], seeds: Sequence[int]) -> Iterator[StepInputs]:
        for batch in self.loader_batches(make_loader(self.dataset, batches, self.num_workers, self.device, seeds)):
            images = batch["image"].to(self.device, non_blocking=True)
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                out = self.backbone(images, with_attention=True)
            weights = neighbour_weights(out, self.backbone, self.sigma)
            aug = (augmented_features(self.backbone, batch["image_aug"], self.device, self.amp_dtype)
                   if self.with_augmented else None)
            yield StepInputs(out.features, weights, batch["label"].to(self.device, non_blocking=True), aug)

    def feature_maps(self, batches: Sequence[list[int]]) -> Iterator[torch.Tensor]:
        """(B, C, h, w) backbone features of the given batches (for the threshold pools)."""
        for batch in make_loader(self.plain_dataset, batches, self.num_workers, self.device):
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                yield self.backbone(batch["image"].to(self.device, non_blocking=True)).features
