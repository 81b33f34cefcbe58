"""What every path of the HP loss shares: its settings and the per-anchor terms.

The loss is -sum_i c_i n_i (see ``hpseg.method.loss``); c_i, the positive-weight sums W_i and
which anchors are kept depend on the masks of the anchor's image only, so every path computes
them the same way, from counts of positives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class LossSettings:
    """The scalars of one loss call.

    lmbd: weight of task-specific positives; tau: temperature; scale: f = tau / tau_base
    [ref quirk] or 1; chunk_size: anchors per chunk of the torch path (None: by memory);
    matmul_dtype: dtype of the similarity products; anchor_images: the images whose anchors'
    terms this call sums (None: all; a rank's share of the global batch under ``torchrun``).
    """

    lmbd: float
    tau: float
    scale: float
    reweighting: bool
    chunk_size: int | None
    matmul_dtype: torch.dtype
    anchor_images: range | None = None

    def images(self, n_images: int) -> range:
        """The images whose anchors this call sums, of a batch of ``n_images``."""
        images = self.anchor_images or range(n_images)
        if images.step != 1 or images.start < 0 or images.stop > n_images or not len(images):
            raise ValueError(f"anchor images {images} are not a run of the batch's {n_images} images")
        return images


class AnchorTerms(NamedTuple):
    """Per-anchor terms of some anchors, each (r,): kept (bool: has a task-agnostic positive),
    weight_sums W_i (|TA(i)| + lambda |TS(i)|), coefficients c_i."""

    kept: torch.Tensor
    weight_sums: torch.Tensor
    coefficients: torch.Tensor

    def rows(self, rows: slice) -> AnchorTerms:
        return AnchorTerms(self.kept[rows], self.weight_sums[rows], self.coefficients[rows])


@functools.lru_cache(maxsize=64)
def _byte_group(n: int) -> int:
    return max(g for g in range(1, min(n, 255) + 1) if n % g == 0)


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True along the last dimension, int32.

    Sums the bytes in groups of at most 255 in uint8 first: bool.sum casts the whole mask to int64,
    several times slower.
    """
    n = mask.shape[-1]
    group = _byte_group(n)
    partial = mask.view(torch.uint8).reshape(*mask.shape[:-1], n // group, group).sum(-1, dtype=torch.uint8)
    return partial.sum(-1, dtype=torch.int32)


def image_coefficients(
    weight_sums: torch.Tensor, kept: torch.Tensor, scale: float, reweighting: bool, n_images: int
) -> torch.Tensor:
    """Per-anchor c_i such that an image's loss is -sum_i c_i n_i (see ``hpseg.method.loss``).

    Shapes: weight_sums and kept (..., hw), the anchors of an image along the last axis -> (..., hw).
    """
    if reweighting:
        denominators = torch.where(kept, weight_sums, 0.0).sum(-1, keepdim=True).expand_as(weight_sums)
    else:
        denominators = weight_sums * kept.sum(-1, keepdim=True)
    # Anchors without a task-agnostic positive are skipped; an image with none adds nothing
    # (the reference would produce NaN there).
    return torch.where(kept, scale / denominators.clamp_min(1e-12), 0.0) / (2 * n_images)


def anchor_terms(
    agnostic_counts: torch.Tensor, specific_counts: torch.Tensor | None, settings: LossSettings, n_images: int,
    dtype: torch.dtype,
) -> AnchorTerms:
    """The terms of whole images from their anchors' counts |TA(i)| and |TS(i)| (None: no TS).

    Shapes: counts (..., hw) int, the anchors of an image along the last axis -> terms (..., hw).
    """
    kept = agnostic_counts > 0
    weight_sums = agnostic_counts.to(dtype)
    if specific_counts is not None:
        weight_sums = weight_sums + settings.lmbd * specific_counts.to(dtype)
    coefficients = image_coefficients(weight_sums, kept, settings.scale, settings.reweighting, n_images)
    return AnchorTerms(kept, weight_sums, coefficients)


def pair_gradient_bound(terms: AnchorTerms, lmbd: float | torch.Tensor, tau: float) -> torch.Tensor:
    """0-dim bound on |g_ij| = |c_i (W_i p_ij - w_ij)| / tau over the anchors given
    (p_ij <= 1, w_ij <= 1 + |lambda|); at least 1e-30.

    Under float16 products the pair gradient goes in as g / bound: its entries (about c_i / tau,
    1e-7 at the paper's batch) would fall below float16's range.
    """
    kept, weight_sums, coefficients = terms
    bound = (torch.where(kept, coefficients * weight_sums, 0.0) + (1 + abs(lmbd)) * coefficients.abs()) / tau
    return bound.amax().clamp_min(1e-30)
