"""The CUDA path of the HP loss: the pair work in the two fused Triton kernels (``triton_kernels``).

Under half-precision products with the shared contrast pattern: the per-anchor sums of the whole
batch come first (one kernel: masks, counts and an online softmax, nothing stored); the loss and
the per-anchor scales of the gradient follow in O(N); then, a block of anchors at a time,
G_ij = g_ij + g_ji (second kernel) and grad_i = sum_j G_ij e_j (one product). Nothing of size
(anchors x N) but one block of G is stored.

This module imports Triton (through ``triton_kernels``); ``backend`` imports it only when the
kernels may run.
"""

from __future__ import annotations

import torch

from hpseg.method.loss import triton_kernels
from hpseg.method.loss.terms import AnchorTerms, LossSettings, anchor_terms, pair_gradient_bound
from hpseg.method.positives import PositiveInputs

AVAILABLE = triton_kernels.AVAILABLE


def triton_loss_and_gradients(
    embeddings: list[torch.Tensor], want_grads: list[bool], inputs: PositiveInputs, settings: LossSettings,
    pair_gradient_rows: int,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The loss -sum_i c_i (n_i(z) + n_i(z_mix)) and its gradients (float32; None where not wanted).

    ``pair_gradient_rows``: rows of one block of G per embedding (at most 2^26 entries), rounded down
    to whole multiples of the kernels' largest row tile.
    """
    lmbd, tau, matmul_dtype = settings.lmbd, settings.tau, settings.matmul_dtype
    n, hw = inputs.n_patches, inputs.patches_per_image
    device = inputs.task_agnostic.device
    sources = [e.detach().to(matmul_dtype) for e in embeddings]
    pattern = inputs.contrast_draw.rows(0, hw, hw, n).to(device)  # the whole (hw, N) pattern, shape checked
    pairs = triton_kernels.PairInputs(
        inputs.task_agnostic, inputs.task_specific, inputs.agnostic_thresholds,
        inputs.specific_thresholds if lmbd != 0.0 else None, pattern, sources, tau,
    )
    images = settings.images(n // hw)
    own = slice(images.start * hw, images.stop * hw)  # the anchors this call sums (all, or a rank's)
    counts, stats = triton_kernels.row_statistics(pairs, own)
    per_image = counts.view(2, len(images), hw)
    by_image = anchor_terms(per_image[0], per_image[1], settings, n // hw, torch.float32)
    terms = AnchorTerms(*(t.reshape(-1) for t in by_image))
    kept, weight_sums, coefficients = terms
    row_max, exp_sum, agnostic_sum, specific_sum = stats.unbind(1)  # each (2, M): z and z_mix
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)  # anchors with an empty contrast set
    values = agnostic_sum + lmbd * specific_sum - weight_sums * (shift + exp_sum.log())
    total = torch.where(kept, coefficients * values, 0.0).sum()
    if not any(want_grads):
        return -total, [None, None]
    # g_ij = c_i (W_i p_ij - w_ij) / tau, p_ij = exp(l_ij - shift_i) / exp_sum_i over C(i).
    softmax_scale = torch.where(kept, coefficients * weight_sums / exp_sum, 0.0) / tau
    # Anchors outside ``own`` have scales 0: their g_ij vanish, so G_ij = g_ij for j outside ``own``.
    scales = torch.zeros(2, 3, n, dtype=torch.float32, device=device)
    scales[:, :, own] = torch.stack([shift, softmax_scale, (coefficients / tau).expand_as(shift)], dim=1)
    factor = 1.0
    if matmul_dtype == torch.float16:  # G / factor: |G_ij| <= |g_ij| + |g_ji| <= factor
        factor = float(2 * pair_gradient_bound(terms, lmbd, tau))
    grads = [torch.zeros(e.shape, dtype=torch.float32, device=device) if want else None
             for e, want in zip(embeddings, want_grads)]
    _add_pair_gradients(pairs, scales, sources, grads, lmbd, factor, pair_gradient_rows, own)
    return -total, grads


# At most this many entries in one block of G per embedding.
_PAIR_GRADIENT_ELEMENTS = 1 << 26


def _add_pair_gradients(
    pairs: triton_kernels.PairInputs, scales: torch.Tensor, sources: list[torch.Tensor],
    grads: list[torch.Tensor | None], lmbd: float, factor: float, block_rows: int, own: slice,
) -> None:
    """grads (N, D) float32 += the gradient of the pairs of the anchors ``own``, a block of rows of G
    at a time; G is written as G / factor. Rows i of ``own``: G_i @ e. Patches j outside ``own``
    (a rank's share of a gathered batch) receive sum_{i in own} g_ij e_i, the transposed product."""
    n = pairs.n
    align = triton_kernels.ROW_ALIGNMENT
    block = min(own.stop - own.start, max(align, min(block_rows, _PAIR_GRADIENT_ELEMENTS // n) // align * align))
    buffers = [None if grad is None else torch.empty(block, n, dtype=source.dtype, device=source.device)
               for grad, source in zip(grads, sources)]
    for start in range(own.start, own.stop, block):
        rows = slice(start, min(start + block, own.stop))
        outputs = tuple(None if b is None else b[: rows.stop - rows.start] for b in buffers)
        triton_kernels.symmetric_pair_gradients(pairs, scales, rows, outputs, lmbd, 1.0 / factor)
        for grad, pair_grad, source in zip(grads, outputs, sources):
            if grad is None:
                continue
            grad[rows].add_(pair_grad @ source, alpha=factor)  # in float32: the product times factor could underflow
            for columns in (slice(0, own.start), slice(own.stop, n)):
                if columns.stop > columns.start:
                    grad[columns].add_(pair_grad[:, columns].T @ source[rows], alpha=factor)
