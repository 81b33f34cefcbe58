"""The torch path of the HP loss: one image at a time, a chunk of anchors at a time, tile by tile.

Each image's anchors' masks against all N patches come first (``positives.image_masks``, which on
the CPU compares each pair of patches once: TA and TS are symmetric), then its anchor terms, then
its anchors' terms of the loss, in chunks. The gradient is computed along with the value (it is
linear in the same per-pair quantities), so backward only scales it: nothing is recomputed.

A chunk of anchors against the hw patches of one image is a tile. A tile whose share of pairs
needing a logit is at most the backend's density limit goes through the sparse path (``sparse``),
denser ones (an image against itself, rho near 1 as for Potsdam) through dense products: in place
on the CPU (``cpu``), compiled elementwise work on CUDA (``dense``).

Memory beyond inputs and gradients is O(hw x N) for one image's masks and one chunk's
temporaries, plus at most N^2 / 32 bytes per mask for the bit-packed blocks kept for later images.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hpseg.method.loss.cpu import CpuDenseBlock
from hpseg.method.loss.dense import DenseBlock, DenseFunctions
from hpseg.method.loss.sparse import SparseTiles
from hpseg.method.loss.terms import AnchorTerms, LossSettings, anchor_terms, count_true, pair_gradient_bound
from hpseg.method.positives import PositiveInputs, PositiveMasks, image_masks

# Anchors per chunk: one image's, unless a (chunk x N) temporary would exceed this many elements.
_CHUNK_ELEMENTS = 1 << 26


def auto_chunk_size(n_patches: int, patches_per_image: int) -> int:
    """Anchors per chunk: a whole image (hw), or fewer if one (chunk x N) float32 matrix would pass 256 MB."""
    return max(1, min(patches_per_image, _CHUNK_ELEMENTS // max(1, n_patches)))


def accumulation_dtype(matmul_dtype: torch.dtype) -> torch.dtype:
    """Softmax and sums stay in float32 under half-precision products; float64 (gradcheck) stays float64."""
    return torch.float64 if matmul_dtype == torch.float64 else torch.float32


class Tiles(Protocol):
    """Some tiles of a chunk of anchors (r of them), computed in three passes per embedding."""

    def row_terms(
        self, scaled: torch.Tensor, embedding: torch.Tensor, source: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From the anchors over tau (r, D), the embedding (N, D) and it in the product dtype:
        the row maximum of the logits (-inf without a pair) and sum_j w_ij logit_ij, (r,) each."""

    def normaliser(self, shift: torch.Tensor) -> torch.Tensor:
        """sum_{j in C(i)} exp(logit_ij - shift_i): (r,) -> (r,)."""

    def add_gradients(
        self, softmax_scale: torch.Tensor, weight_scale: torch.Tensor, factor: torch.Tensor | None, grad: torch.Tensor
    ) -> None:
        """grad (N, D) += the gradient of g_ij = softmax_scale_i exp(logit_ij - shift_i) 1[j in C(i)] - weight_scale_i w_ij."""


def torch_loss_and_gradients(
    embeddings: list[torch.Tensor], want_grads: list[bool], inputs: PositiveInputs, settings: LossSettings,
    density_limit: float, dense_functions: DenseFunctions,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The loss -sum_i c_i (n_i(z) + n_i(z_mix)) and its gradients (None where not wanted).

    ``density_limit``: tiles with at most this share of pairs go through the sparse path (negative:
    every tile dense); ``dense_functions``: the dense blocks' elementwise work off the CPU.
    """
    dtype = accumulation_dtype(settings.matmul_dtype)
    embeddings = [e.detach().to(dtype) for e in embeddings]
    grads = [torch.zeros_like(e) if want else None for e, want in zip(embeddings, want_grads)]
    sources = [e.to(settings.matmul_dtype) for e in embeddings]  # cast once, not per image
    n_patches, hw = embeddings[0].shape[0], inputs.patches_per_image
    chunk_size = settings.chunk_size or auto_chunk_size(n_patches, hw)
    total = torch.zeros((), dtype=dtype, device=embeddings[0].device)
    # Once per call (on a GPU each is a host-to-device copy), and a tensor rather than a float: the
    # compiled dense functions are not rebuilt when lambda changes.
    lmbd = torch.tensor(settings.lmbd, dtype=dtype, device=total.device)
    # The coefficients of an image need all its anchors' masks: they come one image at a time.
    images = settings.images(n_patches // hw)
    masks_of_images = image_masks(inputs, task_specific=settings.lmbd != 0.0, chunk_size=chunk_size, images=images)
    for image, masks in zip(images, masks_of_images):
        specific_counts = None if masks.task_specific is None else count_true(masks.task_specific)
        terms = anchor_terms(count_true(masks.task_agnostic), specific_counts, settings, n_patches // hw, dtype)
        for first in range(0, hw, chunk_size):
            local = slice(first, min(first + chunk_size, hw))
            if not bool(terms.kept[local].any()):
                continue
            rows = slice(image * hw + local.start, image * hw + local.stop)
            tiles = chunk_tiles(_rows_of(masks, local), rows, terms.kept[local], lmbd, hw, density_limit,
                                dense_functions, want_grad=any(want_grads))
            for embedding, source, grad in zip(embeddings, sources, grads):
                total += embedding_terms(tiles, embedding, source, grad, rows, terms.rows(local), settings)
    return -total, grads


def _rows_of(masks: PositiveMasks, local: slice) -> PositiveMasks:
    specific = None if masks.task_specific is None else masks.task_specific[local]
    return PositiveMasks(masks.task_agnostic[local], specific, masks.contrast[local])


def _dense_ranges(dense: list[bool], hw: int) -> list[slice]:
    """Column ranges of the dense tiles (one tile per image), neighbours merged."""
    ranges: list[slice] = []
    for image, is_dense in enumerate(dense):
        if not is_dense:
            continue
        if ranges and ranges[-1].stop == image * hw:
            ranges[-1] = slice(ranges[-1].start, (image + 1) * hw)
        else:
            ranges.append(slice(image * hw, (image + 1) * hw))
    return ranges


def chunk_tiles(
    masks: PositiveMasks, rows: slice, kept: torch.Tensor, lmbd: torch.Tensor, hw: int, density_limit: float,
    dense_functions: DenseFunctions, want_grad: bool,
) -> list[Tiles]:
    """The tiles of a chunk of anchors (``rows`` of the batch; ``masks`` their (r, N) masks): the
    sparse ones together, first, then each range of neighbouring dense ones."""
    n_anchors, n_patches = masks.task_agnostic.shape
    on_cpu = masks.contrast.device.type == "cpu"

    def dense_block(columns: slice) -> Tiles:
        return CpuDenseBlock(masks, rows, columns, lmbd) if on_cpu else DenseBlock(masks, rows, columns, lmbd, dense_functions)

    if density_limit < 0:  # every tile dense: no need to look at the pairs
        return [dense_block(slice(0, n_patches))]
    pairs = masks.contrast.clone()
    if masks.task_specific is not None:
        pairs.logical_or_(masks.task_specific)
    pairs.logical_and_(kept[:, None])
    tile_pairs = count_true(pairs.view(n_anchors, n_patches // hw, hw)).sum(0)
    is_dense = tile_pairs > density_limit * n_anchors * hw
    dense_flags, sparse_flags = torch.stack([is_dense, (tile_pairs > 0) & ~is_dense]).tolist()
    dense_ranges = _dense_ranges(dense_flags, hw)
    tiles: list[Tiles] = []
    if any(sparse_flags):
        for columns in dense_ranges:
            pairs[:, columns] = False  # what is left of the pairs goes through the sparse path
        tiles.append(SparseTiles(pairs, masks, rows, hw, lmbd, want_grad))
    return tiles + [dense_block(columns) for columns in dense_ranges]


def embedding_terms(
    tiles: list[Tiles], embedding: torch.Tensor, source: torch.Tensor, grad: torch.Tensor | None, rows: slice,
    terms: AnchorTerms, settings: LossSettings,
) -> torch.Tensor:
    """sum_i c_i n_i(e) over the anchors ``rows`` of the batch, through their ``tiles``; adds the
    gradient of -sum_i c_i n_i to ``grad`` (None: not wanted). Shapes: embedding (N, D), float32+;
    source: it in the product dtype; terms (r,) each."""
    kept, weight_sums, coefficients = terms
    tau = settings.tau
    scaled = embedding[rows] / tau
    # Any per-anchor shift gives the same log-softmax; the row maximum keeps exp in range.
    shift = torch.full_like(weight_sums, float("-inf"))
    weighted = torch.zeros_like(weight_sums)
    for part in tiles:
        row_max, row_weighted = part.row_terms(scaled, embedding, source)
        torch.maximum(shift, row_max, out=shift)
        weighted += row_weighted
    shift = torch.where(torch.isfinite(shift), shift, 0.0)  # anchors without any pair
    normaliser = torch.zeros_like(shift)
    for part in tiles:
        normaliser += part.normaliser(shift)
    total = torch.where(kept, coefficients * (weighted - weight_sums * (shift + normaliser.log())), 0.0).sum()
    if grad is None:
        return total
    # d(-c_i n_i)/d logit_ij = c_i (W_i p_ij - w_ij), p_ij = exp_ij / normaliser_i; logit = <e_i, e_j> / tau.
    softmax_scale = torch.where(kept, coefficients * weight_sums / normaliser, 0.0) / tau
    weight_scale = coefficients / tau
    # Under float16 products g goes in as g / factor, factor a bound on |g_ij| (exp_ij <= normaliser_i).
    factor = pair_gradient_bound(terms, settings.lmbd, tau) if source.dtype == torch.float16 else None
    for part in tiles:
        part.add_gradients(softmax_scale, weight_scale, factor, grad)
    return total
