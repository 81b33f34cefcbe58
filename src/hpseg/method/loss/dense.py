"""The dense path of the torch loss off the CPU: tiles through dense products, elementwise work compiled.

A dense block is a chunk of anchors against a range of columns (neighbouring dense tiles merged):
its logits come from one product in the product dtype; the elementwise passes and row
reductions over it are compiled by ``torch.compile`` on CUDA (they fuse into a few kernels that
read each (r, n) block once or twice, instead of about a dozen passes), eager elsewhere.
``add_dense_gradients`` is shared with the CPU's dense blocks (``cpu``).
"""

from __future__ import annotations

import functools
import warnings

import torch

from hpseg.method.positives import PositiveMasks


def positive_weights(agnostic: torch.Tensor, specific: torch.Tensor | None, lmbd: torch.Tensor) -> torch.Tensor:
    """w_ij = 1[j in TA(i)] + lambda 1[j in TS(i)]: (r, n) bool masks -> (r, n) in lambda's dtype."""
    weights = agnostic.to(lmbd.dtype)
    return weights if specific is None else weights + lmbd * specific.to(lmbd.dtype)


def widened(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 (softmax and sums); float32 and float64 as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _row_terms(
    logits: torch.Tensor, agnostic: torch.Tensor, specific: torch.Tensor | None, lmbd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maximum and sum_j w_ij logit_ij of a dense block. logits (r, n), masks (r, n) -> (r,), (r,) float32+."""
    logits = widened(logits)
    return logits.amax(1), (positive_weights(agnostic, specific, lmbd) * logits).sum(1)


def _contrast_exp(logits: torch.Tensor, shift: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """exp(logit_ij - shift_i) for j in C(i), else 0: (r, n), (r,), (r, n) bool -> (r, n) float32+."""
    return torch.where(contrast, (widened(logits) - shift[:, None]).exp(), 0.0)


def _normaliser(logits: torch.Tensor, shift: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """sum_{j in C(i)} exp(logit_ij - shift_i) of a dense block: (r, n), (r,), (r, n) bool -> (r,) float32+."""
    return _contrast_exp(logits, shift, contrast).sum(1)


def _pair_gradient(
    logits: torch.Tensor,
    shift: torch.Tensor,
    contrast: torch.Tensor,
    agnostic: torch.Tensor,
    specific: torch.Tensor | None,
    lmbd: torch.Tensor,
    softmax_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    inverse_factor: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """g_ij / factor in ``out_dtype``, g_ij = softmax_scale_i exp(logit_ij - shift_i) 1[j in C(i)] - weight_scale_i w_ij.

    Shapes: logits and masks (r, n), the per-anchor vectors (r,), inverse_factor 0-dim.
    """
    exp = _contrast_exp(logits, shift, contrast)
    pair_grad = exp * softmax_scale[:, None] - positive_weights(agnostic, specific, lmbd) * weight_scale[:, None]
    return (pair_grad * inverse_factor).to(out_dtype)


class CompiledOnCuda:
    """A dense-block function, compiled on CUDA when ``compile``, eager elsewhere. If compiling fails
    (no Triton, an unsupported GPU) it warns once and stays eager: both compute the same."""

    def __init__(self, function, compile: bool):
        self.function = function
        self.compile = compile
        self.compiled = None
        self.failed = False
        functools.update_wrapper(self, function)

    def __call__(self, *args):
        if self.compile and not self.failed and args[0].device.type == "cuda":
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.function, fullgraph=True, dynamic=True)
                return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure: the eager version is exact
                self.failed = True
                warnings.warn(f"HP loss: torch.compile of {self.function.__name__} failed ({error!r}); running eagerly", stacklevel=2)
        return self.function(*args)


class DenseFunctions:
    """The elementwise work of the dense blocks off the CPU, each compiled once for its owner (a
    ``LossBackend``): compiling takes seconds, and a failure is met, and warned about, once."""

    def __init__(self, compile: bool) -> None:
        self.row_terms = CompiledOnCuda(_row_terms, compile)
        self.normaliser = CompiledOnCuda(_normaliser, compile)
        self.pair_gradient = CompiledOnCuda(_pair_gradient, compile)


def add_dense_gradients(
    pair_grad: torch.Tensor,
    factor: torch.Tensor | None,
    source: torch.Tensor,
    grad: torch.Tensor,
    rows: slice,
    columns: slice,
) -> None:
    """grad_i += factor sum_j g_ij e_j (anchors i in ``rows``) and grad_j += factor sum_i g_ij e_i (j in ``columns``).

    ``pair_grad`` and ``source`` (the embedding) are in the product dtype; ``factor`` (0-dim, or None
    for 1) undoes the scaling of g under float16. Where the columns hold the anchors themselves
    (an image against itself) both sums land on the same rows: one product with g + g^T does the two.
    """

    def add(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        if factor is None and left.dtype == target.dtype:
            target.addmm_(left, right)  # no (r x D) temporary
        elif factor is None:
            target.add_(left @ right)
        else:
            target.addcmul_(left @ right, factor)  # in float32: the product times factor could underflow in float16

    inner = slice(max(rows.start, columns.start), min(rows.stop, columns.stop))
    if inner != rows:  # the anchors are not all among the columns
        add(grad[rows], pair_grad, source[columns])
        add(grad[columns], pair_grad.T, source[rows])
        return
    square = pair_grad[:, inner.start - columns.start : inner.stop - columns.start]
    add(grad[rows], square + square.T, source[rows])
    for outer in (slice(columns.start, inner.start), slice(inner.stop, columns.stop)):
        if outer.start < outer.stop:
            part = pair_grad[:, outer.start - columns.start : outer.stop - columns.start]
            add(grad[rows], part, source[outer])
            add(grad[outer], part.T, source[rows])


class DenseBlock:
    """A chunk of anchors (``rows`` of the batch) against the ``columns`` of a dense block, off the CPU."""

    def __init__(self, masks: PositiveMasks, rows: slice, columns: slice, lmbd: torch.Tensor,
                 functions: DenseFunctions):
        self.rows, self.columns, self.lmbd, self.functions = rows, columns, lmbd, functions
        self.agnostic = masks.task_agnostic[:, columns]
        self.specific = None if masks.task_specific is None else masks.task_specific[:, columns]
        self.contrast = masks.contrast[:, columns]
        self.logits: torch.Tensor | None = None  # of the current embedding, in the product dtype

    def row_terms(self, scaled: torch.Tensor, embedding: torch.Tensor, source: torch.Tensor):
        """Row maximum and sum_j w_ij logit_ij: scaled anchors (r, D) float32+ -> (r,), (r,)."""
        self.logits = None  # the previous embedding's block goes before this one's is made
        self.source = source
        self.logits = scaled.to(source.dtype) @ source[self.columns].T
        return self.functions.row_terms(self.logits, self.agnostic, self.specific, self.lmbd)

    def normaliser(self, shift: torch.Tensor) -> torch.Tensor:
        """sum_{j in C(i)} exp(logit_ij - shift_i): (r,) -> (r,)."""
        self.shift = shift
        return self.functions.normaliser(self.logits, shift, self.contrast)

    def add_gradients(self, softmax_scale: torch.Tensor, weight_scale: torch.Tensor, factor: torch.Tensor | None,
                      grad: torch.Tensor) -> None:
        """grad += this block's gradient; g goes in as g / factor (None: 1) in the product dtype."""
        inverse_factor = torch.ones_like(softmax_scale[0]) if factor is None else 1 / factor
        pair_grad = self.functions.pair_gradient(
            self.logits, self.shift, self.contrast, self.agnostic, self.specific, self.lmbd, softmax_scale,
            weight_scale, inverse_factor, self.source.dtype,
        )
        add_dense_gradients(pair_grad, factor, self.source, grad, self.rows, self.columns)
