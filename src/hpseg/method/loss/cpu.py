"""The dense path of the torch loss on the CPU: the elementwise passes in place.

On the CPU nothing fuses the elementwise passes over a dense block: each pass costs about as much
as a product's worth of memory traffic, so they run in place on the logits (which become exp_ij,
reused by the gradient), and w_ij is made once per chunk for both embeddings instead of twice
per embedding.
"""

from __future__ import annotations

import torch

from hpseg.method.loss.dense import add_dense_gradients, widened
from hpseg.method.positives import PositiveMasks


def _positive_weights(agnostic: torch.Tensor, specific: torch.Tensor | None, lmbd: torch.Tensor) -> torch.Tensor:
    """w_ij = 1[j in TA(i)] + lambda 1[j in TS(i)] in one (r, n) buffer: bool masks -> lambda's dtype."""
    if specific is None:
        return agnostic.to(lmbd.dtype)
    return specific.to(lmbd.dtype).mul_(lmbd).add_(agnostic)


def _dense_logits(scaled: torch.Tensor, source: torch.Tensor, rows: slice, columns: slice) -> torch.Tensor:
    """scaled @ source[columns].T, ``scaled`` the anchors ``rows`` of ``source`` over tau: (r, D) -> (r, n).

    Where the columns are the anchors themselves (an image against itself) the block is symmetric
    up to rounding: it is computed in row quarters, each against itself and the columns after it,
    the rest copied transposed from the earlier quarters; 10/16 of the product (on 2 cores 6.7 ms
    against 10.2 ms for 784 x 512 x 784).
    """
    if rows != columns:
        return scaled @ source[columns].T
    n = rows.stop - rows.start
    anchors = source[rows]
    logits = torch.empty(n, n, dtype=scaled.dtype, device=scaled.device)
    step = -(-n // 4)
    for start in range(0, n, step):
        stop = min(start + step, n)
        torch.mm(scaled[start:stop], anchors[start:].T, out=logits[start:stop, start:])
        logits[start:stop, :start] = logits[:start, start:stop].T
    return logits


class CpuDenseBlock:
    """A chunk of anchors (``rows`` of the batch) against the ``columns`` of a dense block, on the CPU."""

    def __init__(self, masks: PositiveMasks, rows: slice, columns: slice, lmbd: torch.Tensor):
        self.rows, self.columns = rows, columns
        specific = None if masks.task_specific is None else masks.task_specific[:, columns]
        self.weights = _positive_weights(masks.task_agnostic[:, columns], specific, lmbd)
        self.contrast = masks.contrast[:, columns]
        self.logits: torch.Tensor | None = None  # of the current embedding, float32+; then exp_ij

    def row_terms(self, scaled: torch.Tensor, embedding: torch.Tensor, source: torch.Tensor):
        """Row maximum and sum_j w_ij logit_ij: scaled anchors (r, D) float32+ -> (r,), (r,)."""
        self.logits = None  # the previous embedding's block goes before this one's is made
        self.source = source
        self.logits = widened(_dense_logits(scaled.to(source.dtype), source, self.rows, self.columns))
        return self.logits.amax(1), torch.linalg.vecdot(self.weights, self.logits)

    def normaliser(self, shift: torch.Tensor) -> torch.Tensor:
        """sum_{j in C(i)} exp(logit_ij - shift_i): (r,) -> (r,). The logits become exp_ij.

        shift_i is at least the row maximum, so exp <= 1 and the product with the mask never meets inf.
        """
        return self.logits.sub_(shift[:, None]).exp_().mul_(self.contrast).sum(1)

    def add_gradients(self, softmax_scale: torch.Tensor, weight_scale: torch.Tensor, factor: torch.Tensor | None,
                      grad: torch.Tensor) -> None:
        """grad += this block's gradient, g_ij = softmax_scale_i exp_ij - weight_scale_i w_ij, made in
        place of exp_ij; g goes in as g / factor (None: 1) in the product dtype."""
        pair_grad = self.logits.mul_(softmax_scale[:, None]).addcmul_(self.weights, weight_scale[:, None], value=-1)
        if factor is not None:
            pair_grad.mul_(1 / factor)
        add_dense_gradients(pair_grad.to(self.source.dtype), factor, self.source, grad, self.rows, self.columns)
