"""Global hidden positives (GHP, spec §3): who is a positive of whom, and the contrast set.

Anchors are the N patches of a minibatch, flattened image after image, row-major inside each
image. Everything here works on a chunk of anchor rows [start, stop) against all N patches,
so no N x N matrix is ever built by the loss; :func:`hidden_positive_masks` assembles the full
matrices for inspection and tests only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


def pool_thresholds(features: torch.Tensor, pool: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """r_i = max_p <features_i, pool_p>: each patch's best match in the reference pool.

    Args:
        features: (N, C) L2-normalised patch features.
        pool: (P, C) L2-normalised reference pool.
    Returns:
        (N,) thresholds, in the dtype of the product.
    """
    return torch.cat([(part @ pool.T).amax(1) for part in features.split(chunk_size)])


class ContrastDraw(Protocol):
    """The random part of the contrast set: which patches each anchor contrasts with.

    ``rows(start, stop, patches_per_image, n_patches)`` returns a (stop - start, N) bool mask
    and must return the same mask every time it is called with the same arguments (the loss
    calls it again in its backward pass).
    """

    def rows(self, start: int, stop: int, patches_per_image: int, n_patches: int) -> torch.Tensor: ...


@dataclass
class SharedContrastPattern:
    """[ref quirk] One (hw, N) random pattern per step; anchor i of every image uses row i mod hw.

    ``pattern[i, j]`` is True when patch j is in the random subsample of anchor i. Build it
    from an explicit uniform draw with ``from_uniform`` (tests, reproducibility) or with
    ``draw`` from a generator.
    """

    pattern: torch.Tensor  # (hw, N) bool

    @classmethod
    def from_uniform(cls, uniform: torch.Tensor, rho: float) -> "SharedContrastPattern":
        """``uniform`` (hw, N) in [0, 1): patch j joins anchor i's subsample iff uniform[i, j] < rho."""
        return cls(uniform < rho)

    @classmethod
    def draw(
        cls,
        patches_per_image: int,
        n_patches: int,
        rho: float,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> "SharedContrastPattern":
        uniform = torch.rand(patches_per_image, n_patches, generator=generator, device=device)
        return cls.from_uniform(uniform, rho)

    def rows(self, start: int, stop: int, patches_per_image: int, n_patches: int) -> torch.Tensor:
        if self.pattern.shape != (patches_per_image, n_patches):
            raise ValueError(
                f"contrast pattern of shape {tuple(self.pattern.shape)} does not match "
                f"{patches_per_image} patches per image and {n_patches} patches"
            )
        anchors = torch.arange(start, stop, device=self.pattern.device) % patches_per_image
        return self.pattern[anchors]


@dataclass
class IndependentContrastDraw:
    """A fresh random subsample for every anchor (the clean alternative to the shared pattern).

    The draw of a chunk is regenerated from ``seed`` and the chunk's first anchor, so the loss
    can replay it in its backward pass without storing an N x N mask.
    """

    rho: float
    seed: int
    device: torch.device | str = "cpu"

    def rows(self, start: int, stop: int, patches_per_image: int, n_patches: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + start)
        return torch.rand(stop - start, n_patches, generator=generator, device=self.device) < self.rho


@dataclass
class PositiveMasks:
    """Masks of a chunk of anchors [start, stop) against all N patches, each (stop - start, N) bool."""

    task_agnostic: torch.Tensor  # TA(i)
    task_specific: torch.Tensor  # TS(i)
    contrast: torch.Tensor  # C(i) = TA(i) or random subsample, self excluded


@dataclass
class PositiveInputs:
    """Everything the positive masks depend on; none of it carries gradient.

    Shapes: task_agnostic (N, C) and task_specific (N, D) L2-normalised features,
    thresholds (N,) each.
    """

    task_agnostic: torch.Tensor
    task_specific: torch.Tensor
    agnostic_thresholds: torch.Tensor
    specific_thresholds: torch.Tensor
    patches_per_image: int
    contrast_draw: ContrastDraw

    @classmethod
    def build(
        cls,
        task_agnostic: torch.Tensor,
        task_specific: torch.Tensor,
        pool_agnostic: torch.Tensor,
        pool_specific: torch.Tensor,
        patches_per_image: int,
        contrast_draw: ContrastDraw,
        matmul_dtype: torch.dtype = torch.float32,
    ) -> "PositiveInputs":
        """Normalise features and pools and compute the pool thresholds r and r'."""
        fn = F.normalize(task_agnostic.detach().float(), dim=1).to(matmul_dtype)
        sn = F.normalize(task_specific.detach().float(), dim=1).to(matmul_dtype)
        pool_ag = F.normalize(pool_agnostic.float(), dim=1).to(matmul_dtype)
        pool_sp = F.normalize(pool_specific.float(), dim=1).to(matmul_dtype)
        if fn.shape[0] != sn.shape[0] or fn.shape[0] % patches_per_image:
            raise ValueError(
                f"{fn.shape[0]} task-agnostic and {sn.shape[0]} task-specific rows do not form whole "
                f"images of {patches_per_image} patches"
            )
        return cls(fn, sn, pool_thresholds(fn, pool_ag), pool_thresholds(sn, pool_sp), patches_per_image, contrast_draw)

    @property
    def n_patches(self) -> int:
        return self.task_agnostic.shape[0]

    def masks(self, start: int, stop: int) -> PositiveMasks:
        """TA, TS and C for anchors [start, stop): a j is a positive of i when their similarity beats
        the threshold of either (symmetric), and never i itself."""
        not_self = torch.ones(stop - start, self.n_patches, dtype=torch.bool, device=self.task_agnostic.device)
        anchors = torch.arange(stop - start, device=not_self.device)
        not_self[anchors, anchors + start] = False
        agnostic = _beats_either_threshold(self.task_agnostic, self.agnostic_thresholds, start, stop) & not_self
        specific = _beats_either_threshold(self.task_specific, self.specific_thresholds, start, stop) & not_self
        random_part = self.contrast_draw.rows(start, stop, self.patches_per_image, self.n_patches)
        contrast = (agnostic | random_part.to(not_self.device)) & not_self
        return PositiveMasks(agnostic, specific, contrast)


def _beats_either_threshold(features: torch.Tensor, thresholds: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    similarity = features[start:stop] @ features.T
    return (similarity > thresholds[start:stop, None]) | (similarity > thresholds[None, :])


def hidden_positive_masks(
    task_agnostic: torch.Tensor,
    task_specific: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    patches_per_image: int,
    contrast_draw: ContrastDraw,
) -> PositiveMasks:
    """Full (N, N) masks TA, TS and C of a small batch — for inspection and tests.

    Shapes: task_agnostic (N, C), task_specific (N, D), pools (P, C) and (P, D).
    """
    inputs = PositiveInputs.build(
        task_agnostic, task_specific, pool_agnostic, pool_specific, patches_per_image, contrast_draw
    )
    return inputs.masks(0, inputs.n_patches)
