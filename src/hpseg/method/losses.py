"""The HP losses (spec §5): GHP and LHP contrastive terms, and the consistency loss.

For anchor i with positive weights w_ij = 1[j in TA(i)] + lambda 1[j in TS(i)] and contrast
set C(i), the per-anchor quantity is

    n_i(z) = sum_j w_ij log p_ij,   log p_ij = <z_i, z_j>/tau - log sum_{k in C(i)} exp(<z_i, z_k>/tau)

(the reference subtracts max_k <z_i, z_k>/tau first; it cancels in log p and only serves
stability; here a per-anchor maximum plays that part). With m_i = n_i / W_i, W_i = sum_j w_ij
and, per image, omega_i = W_i / mean over kept anchors of W, the image loss -mean_i(f m_i omega_i)
over the kept anchors (those with a task-agnostic positive) equals

    L(b) = -f * sum_{i kept} n_i / sum_{i kept} W_i                 (reweighting)
    L(b) = -f * mean_{i kept} n_i / W_i                            (no reweighting)

with f = tau / tau_base [ref quirk] or 1. So the loss is -sum_i c_i n_i with coefficients c_i
that depend on the masks of the anchor's image only. How it is computed:

- One image at a time: its anchors' masks against all N patches first (``positives.image_masks``,
  which on the CPU compares each pair of patches once: TA and TS are symmetric), then its coefficients,
  then its anchors' terms, in chunks. The gradient is computed along with the value (it is
  linear in the same per-pair quantities), so backward only scales it: nothing is recomputed.
- On CUDA under half-precision products (AMP) with the shared contrast pattern, all of the pair work
  runs instead in two fused Triton kernels (``triton_kernels``, ``_triton_loss_and_gradients``):
  per-anchor sums over all pairs first (masks, counts and an online softmax, nothing stored), then
  per block of anchors the symmetric pair gradient G = g + g^T and one product G @ e. The rest of
  this list is the torch path (the CPU, float32 products, an independent draw per anchor).
- Only the pairs (i, j) with j in C(i) or TS(i), for kept anchors i, need a logit; with
  rho = 0.02 that is a few percent of the N^2 pairs. A chunk of anchors against the hw patches
  of one image (a tile) goes through sparse kernels (sampled products for the logits, sparse x
  dense products for the gradients) when at most ``SPARSE_DENSITY_LIMIT`` of its pairs need one,
  and through dense products otherwise (an image against itself, rho = 1 as for Potsdam). On a GPU
  every tile is dense and the elementwise work of a dense block is fused by ``torch.compile``.
- Memory beyond inputs and gradients is O(hw x N) for one image's masks and one chunk's
  temporaries, plus at most N^2 / 32 bytes per mask for the bit-packed blocks kept for later
  images, instead of the reference's (hw x N) matrices of every image kept alive until backward
  (O(N^2) floats).

Measured at the paper's scale (batch 64, ViT-S/8: N = 50,176, D = 512, C = 384, float32,
rho = 0.02, lambda = 0.5, one CPU thread; ``benchmarks/loss_benchmark.py --paper-scale``, see
BENCHMARKS.md): forward + backward peak RSS 1.75 GB for the whole process, 1.23 GB above the
0.52 GB it held before its inputs existed; of that about 0.43 GB are the inputs (z, z_mix, f, s',
the random pattern), 0.21 GB the gradients and 0.18 GB the normalised f and s'. The reference's
approach would hold about 80 GB of (hw x N) matrices there. On an NVIDIA H200 with float16
products (as under AMP), through the Triton kernels: 0.62 GiB of GPU memory and 0.11 s, against
35.6 GiB and 0.45 s for a reference-style loss under autocast (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from hpseg.method.positives import (
    ContrastDraw,
    PositiveInputs,
    PositiveMasks,
    SharedContrastPattern,
    image_masks,
)

# Anchors per chunk: one image's, unless a (chunk x N) temporary would exceed this many elements.
_CHUNK_ELEMENTS = 1 << 26
# Logits are needed only for the pairs (i, j) with j in C(i) or TS(i), of anchors i that have a
# positive. A chunk of anchors against the patches of one image (a tile) whose share of such pairs
# is at most the limit goes through sparse kernels; denser tiles (an image against itself, rho near
# 1 as for Potsdam) through dense products. On the CPU sparse sampled products win up to about
# 15 % (BENCHMARKS.md); on a GPU every tile is dense (a negative limit): there the small sparse
# launches cost more than the dense products they save (measured on an H200: 2.4-5x slower at
# batch 16-64, BENCHMARKS.md). None: by device; a number forces it everywhere.
SPARSE_DENSITY_LIMIT: float | None = None
CPU_SPARSE_DENSITY_LIMIT = 0.15


def auto_chunk_size(n_patches: int, patches_per_image: int) -> int:
    """Anchors per chunk: a whole image (hw), or fewer if one (chunk x N) float32 matrix would pass 256 MB."""
    return max(1, min(patches_per_image, _CHUNK_ELEMENTS // max(1, n_patches)))


def _accumulation_dtype(matmul_dtype: torch.dtype) -> torch.dtype:
    # Softmax and sums stay in float32 under half-precision products; float64 (gradcheck) stays float64.
    return torch.float64 if matmul_dtype == torch.float64 else torch.float32


def _csr(row_starts: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(row_starts, columns, values, size=size, check_invariants=False)


@functools.lru_cache(maxsize=64)
def _byte_group(n: int) -> int:
    return max(g for g in range(1, min(n, 255) + 1) if n % g == 0)


def _count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True along the last dimension, int32.

    Sums the bytes in groups of at most 255 in uint8 first: bool.sum casts the whole mask to int64,
    several times slower.
    """
    n = mask.shape[-1]
    group = _byte_group(n)
    partial = mask.view(torch.uint8).reshape(*mask.shape[:-1], n // group, group).sum(-1, dtype=torch.uint8)
    return partial.sum(-1, dtype=torch.int32)


def _image_coefficients(
    weight_sums: torch.Tensor, kept: torch.Tensor, scale: float, reweighting: bool, n_images: int
) -> torch.Tensor:
    """Per-anchor c_i such that an image's loss is -sum_i c_i n_i (see the module docstring).

    Shapes: weight_sums and kept (..., hw), the anchors of an image along the last axis -> (..., hw).
    """
    if reweighting:
        denominators = torch.where(kept, weight_sums, 0.0).sum(-1, keepdim=True).expand_as(weight_sums)
    else:
        denominators = weight_sums * kept.sum(-1, keepdim=True)
    # Anchors without a task-agnostic positive are skipped; an image with none adds nothing
    # (the reference would produce NaN there).
    return torch.where(kept, scale / denominators.clamp_min(1e-12), 0.0) / (2 * n_images)


def _tile_major_nonzero(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (tile, row, column) of the True entries of ``tiles`` (rows, n_tiles, hw) bool, tile after
    tile, row-major inside a tile; each (nnz,) int64.

    On the CPU numpy's flatnonzero of a contiguous copy: about twice as fast as torch.nonzero there
    (2 cores, 784 x 3136 pairs at 2 %: 2.3 ms against 4.6 ms).
    """
    if tiles.device.type != "cpu":
        return tiles.transpose(0, 1).nonzero().unbind(1)
    rows, _, hw = tiles.shape
    flat = torch.from_numpy(np.flatnonzero(tiles.transpose(0, 1).contiguous().numpy()))
    within = flat.remainder(rows * hw)
    return flat.div(rows * hw, rounding_mode="floor"), within.div(hw, rounding_mode="floor"), within.remainder(hw)


class _SparsePairs:
    """The pairs of a chunk (anchors x N bool) in the sparse tiles, as one CSR block per tile.

    A tile is the hw patches of one image (so the embedding rows a kernel gathers stay in cache).
    Entries are numbered tile after tile, row-major inside a tile; each block is also kept
    transposed (for sum_i g_ij e_i).
    """

    def __init__(self, pairs: torch.Tensor, hw: int, transposed: bool):
        n_anchors, n_patches = pairs.shape
        tiles = pairs.view(n_anchors, n_patches // hw, hw)
        tile, rows, cols = _tile_major_nonzero(tiles)
        columns = tile * hw + cols
        self.rows, self.flat = rows, rows * n_patches + columns
        counts = _count_true(tiles).T.reshape(-1)  # (tiles x anchors,)
        row_pointer = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=pairs.device)
        torch.cumsum(counts, 0, out=row_pointer[1:])
        if transposed:
            self.order = torch.argsort(columns, stable=True)  # tile-major, then column-major
            self.rows_by_col = rows[self.order]
            col_pointer = torch.zeros(n_patches + 1, dtype=torch.int64, device=pairs.device)
            torch.cumsum(torch.bincount(columns, minlength=n_patches), 0, out=col_pointer[1:])
        self.blocks = []
        pointers = row_pointer[:: n_anchors].tolist()
        for t, (low, high) in enumerate(zip(pointers[:-1], pointers[1:])):
            if high == low:
                continue
            block = dict(
                columns=slice(t * hw, (t + 1) * hw), entries=slice(low, high),
                row_starts=row_pointer[t * n_anchors : (t + 1) * n_anchors + 1] - low,
            )
            if transposed:
                block["col_starts"] = col_pointer[t * hw : (t + 1) * hw + 1] - low
            self.blocks.append(block)
        self.cols = cols

    def products(self, anchors: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """<anchors_i, embedding_j> of every pair (i, j), in entry order."""
        n_anchors = anchors.shape[0]
        values = [
            torch.sparse.sampled_addmm(
                _csr(b["row_starts"], self.cols[b["entries"]], anchors.new_zeros(b["entries"].stop - b["entries"].start),
                     (n_anchors, b["columns"].stop - b["columns"].start)),
                anchors, embedding[b["columns"]].T, beta=0.0,
            ).values()
            for b in self.blocks
        ]
        return torch.cat(values) if values else anchors.new_zeros(0)

    def add_gradients(
        self, pair_grad: torch.Tensor, anchors: torch.Tensor, embedding: torch.Tensor, grad: torch.Tensor, rows: slice
    ) -> None:
        """grad_i += sum_j g_ij e_j for the anchors i (``rows`` of grad) and grad_j += sum_i g_ij e_i."""
        n_anchors = anchors.shape[0]
        by_col = pair_grad[self.order]
        for b in self.blocks:
            entries, columns = b["entries"], b["columns"]
            width = columns.stop - columns.start
            grad[rows].addmm_(
                _csr(b["row_starts"], self.cols[entries], pair_grad[entries], (n_anchors, width)), embedding[columns]
            )
            grad[columns].addmm_(
                _csr(b["col_starts"], self.rows_by_col[entries], by_col[entries], (width, n_anchors)), anchors
            )


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


def _positive_weights(agnostic: torch.Tensor, specific: torch.Tensor | None, lmbd: torch.Tensor) -> torch.Tensor:
    """w_ij = 1[j in TA(i)] + lambda 1[j in TS(i)]: (r, n) bool masks -> (r, n) in lambda's dtype."""
    weights = agnostic.to(lmbd.dtype)
    return weights if specific is None else weights + lmbd * specific.to(lmbd.dtype)


def _widened(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 (softmax and sums); float32 and float64 as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _dense_row_terms(
    logits: torch.Tensor, agnostic: torch.Tensor, specific: torch.Tensor | None, lmbd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maximum and sum_j w_ij logit_ij of a dense block. logits (r, n), masks (r, n) -> (r,), (r,) float32+."""
    logits = _widened(logits)
    return logits.amax(1), (_positive_weights(agnostic, specific, lmbd) * logits).sum(1)


def _contrast_exp(logits: torch.Tensor, shift: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """exp(logit_ij - shift_i) for j in C(i), else 0: (r, n), (r,), (r, n) bool -> (r, n) float32+."""
    return torch.where(contrast, (_widened(logits) - shift[:, None]).exp(), 0.0)


def _dense_normaliser(logits: torch.Tensor, shift: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """sum_{j in C(i)} exp(logit_ij - shift_i) of a dense block: (r, n), (r,), (r, n) bool -> (r,) float32+."""
    return _contrast_exp(logits, shift, contrast).sum(1)


def _dense_pair_gradient(
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
    pair_grad = _contrast_exp(logits, shift, contrast) * softmax_scale[:, None] - _positive_weights(agnostic, specific, lmbd) * weight_scale[:, None]
    return (pair_grad * inverse_factor).to(out_dtype)


# The same steps on the CPU, where nothing fuses the elementwise passes over a dense block: each
# pass costs about as much as a product's worth of memory traffic, so they run in place on the
# logits (which become exp_ij, reused by the gradient), and w_ij is made once per chunk for both
# embeddings instead of twice per embedding.
def _cpu_positive_weights(agnostic: torch.Tensor, specific: torch.Tensor | None, lmbd: torch.Tensor) -> torch.Tensor:
    """:func:`_positive_weights` in one (r, n) buffer instead of three."""
    if specific is None:
        return agnostic.to(lmbd.dtype)
    return specific.to(lmbd.dtype).mul_(lmbd).add_(agnostic)


def _cpu_dense_logits(scaled: torch.Tensor, source: torch.Tensor, rows: slice, columns: slice) -> torch.Tensor:
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


def _cpu_row_terms(logits: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maximum and sum_j w_ij logit_ij: logits and weights (r, n) float32+ -> (r,), (r,)."""
    return logits.amax(1), torch.linalg.vecdot(weights, logits)


def _cpu_contrast_exp_(logits: torch.Tensor, shift: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """``logits`` overwritten with exp(logit_ij - shift_i) 1[j in C(i)] and returned.

    shift_i is at least the row maximum, so exp <= 1 and the product with the mask never meets inf.
    """
    return logits.sub_(shift[:, None]).exp_().mul_(contrast)


def _cpu_pair_gradient_(
    exp: torch.Tensor,
    weights: torch.Tensor,
    softmax_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    inverse_factor: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """g_ij / factor in ``out_dtype`` from exp_ij = exp(logit_ij - shift_i) 1[j in C(i)], overwriting ``exp``.

    g_ij = softmax_scale_i exp_ij - weight_scale_i w_ij. Shapes: exp and weights (r, n), the
    per-anchor vectors (r,); inverse_factor 0-dim, or None for 1.
    """
    pair_grad = exp.mul_(softmax_scale[:, None]).addcmul_(weights, weight_scale[:, None], value=-1)
    if inverse_factor is not None:
        pair_grad.mul_(inverse_factor)
    return pair_grad.to(out_dtype)


class _FusedOnCuda:
    """A dense-block function, compiled on CUDA (its elementwise passes and row reductions fuse into
    a few kernels that read each (r, n) block once or twice, instead of about a dozen passes), eager
    elsewhere. If compiling fails (no Triton, an unsupported GPU) it warns once and stays eager:
    both compute the same."""

    enabled = True  # class-wide switch (benchmarks time both)

    def __init__(self, function):
        self.function = function
        self.compiled = None
        self.failed = False
        functools.update_wrapper(self, function)

    def __call__(self, *args):
        if self.enabled and not self.failed and args[0].device.type == "cuda":
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.function, fullgraph=True, dynamic=True)
                return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure: the eager version is exact
                self.failed = True
                warnings.warn(f"HP loss: torch.compile of {self.function.__name__} failed ({error!r}); running eagerly")
        return self.function(*args)


_row_terms = _FusedOnCuda(_dense_row_terms)
_normaliser = _FusedOnCuda(_dense_normaliser)
_pair_gradient = _FusedOnCuda(_dense_pair_gradient)


def sparse_density_limit(device: torch.device) -> float:
    """The tile density at or under which the loss uses sparse kernels on ``device``."""
    if SPARSE_DENSITY_LIMIT is not None:
        return SPARSE_DENSITY_LIMIT
    return CPU_SPARSE_DENSITY_LIMIT if device.type == "cpu" else -1.0


def _chunk_loss(
    masks: PositiveMasks,
    rows: slice,
    kept: torch.Tensor,
    weight_sums: torch.Tensor,
    coefficients: torch.Tensor,
    embeddings: list[torch.Tensor],
    sources: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    lmbd: torch.Tensor,
    tau: float,
    hw: int,
    matmul_dtype: torch.dtype,
) -> torch.Tensor:
    """sum_i c_i (n_i(z) + n_i(z_mix)) over the anchors ``rows`` of a batch; adds the gradients of
    -sum_i c_i n_i to ``grads``. ``masks`` are these anchors' (chunk, N) masks; ``sources`` the
    embeddings in the product dtype."""
    dtype, device = embeddings[0].dtype, embeddings[0].device
    n_anchors, n_patches = masks.task_agnostic.shape
    limit = sparse_density_limit(device)
    if limit < 0:  # every tile dense: no need to look at the pairs
        dense_ranges, sparse_flags = [slice(0, n_patches)], []
    else:
        pairs = masks.contrast.clone()
        if masks.task_specific is not None:
            pairs.logical_or_(masks.task_specific)
        pairs.logical_and_(kept[:, None])
        tile_pairs = _count_true(pairs.view(n_anchors, n_patches // hw, hw)).sum(0)
        is_dense = tile_pairs > limit * n_anchors * hw
        dense_flags, sparse_flags = torch.stack([is_dense, (tile_pairs > 0) & ~is_dense]).tolist()
        dense_ranges = _dense_ranges(dense_flags, hw)
    want_grad = any(grad is not None for grad in grads)

    dense = [
        (columns, masks.task_agnostic[:, columns],
         None if masks.task_specific is None else masks.task_specific[:, columns], masks.contrast[:, columns])
        for columns in dense_ranges
    ]
    sparse = None
    if any(sparse_flags):
        for columns in dense_ranges:
            pairs[:, columns] = False  # what is left of the pairs goes through sparse kernels
        sparse = _SparsePairs(pairs, hw, transposed=want_grad)
        del pairs  # (chunk x N) bool, not needed from here on
        sparse_weights = masks.task_agnostic.reshape(-1)[sparse.flat].to(dtype)
        if masks.task_specific is not None:
            sparse_weights.addcmul_(masks.task_specific.reshape(-1)[sparse.flat].to(dtype), lmbd)
        sparse_contrast = masks.contrast.reshape(-1)[sparse.flat]
        sparse_rows = sparse.rows

    in_place = device.type == "cpu"  # see the comment above _cpu_positive_weights
    weights = [_cpu_positive_weights(agnostic, specific, lmbd) for _, agnostic, specific, _ in dense] if in_place else []
    total = torch.zeros((), dtype=dtype, device=device)
    for embedding, source, grad in zip(embeddings, sources, grads):
        anchors = embedding[rows]
        scaled = anchors / tau
        dense_logits = []  # the previous embedding's blocks go before this one's are made
        if in_place:
            dense_logits = [_widened(_cpu_dense_logits(scaled.to(matmul_dtype), source, rows, columns)) for columns, *_ in dense]
        else:
            dense_logits = [scaled.to(matmul_dtype) @ source[columns].T for columns, *_ in dense]
        # Any per-anchor shift gives the same log-softmax; the row maximum keeps exp in range.
        shift = torch.full((n_anchors,), float("-inf"), dtype=dtype, device=device)
        weighted = torch.zeros_like(shift)
        if sparse is not None:
            sparse_logits = sparse.products(scaled, embedding)
            shift.scatter_reduce_(0, sparse_rows, sparse_logits, "amax")
            weighted.index_add_(0, sparse_rows, sparse_weights * sparse_logits)
        for k, (logits, (_, agnostic, specific, _)) in enumerate(zip(dense_logits, dense)):
            if in_place:
                row_max, row_weighted = _cpu_row_terms(logits, weights[k])
            else:
                row_max, row_weighted = _row_terms(logits, agnostic, specific, lmbd)
            torch.maximum(shift, row_max, out=shift)
            weighted += row_weighted
        shift = torch.where(torch.isfinite(shift), shift, 0.0)  # anchors without any pair
        normaliser = torch.zeros_like(shift)
        if sparse is not None:
            sparse_exp = sparse_logits.sub_(shift[sparse_rows]).exp_().mul_(sparse_contrast)  # the logits are spent
            normaliser.index_add_(0, sparse_rows, sparse_exp)
        for logits, (*_, contrast) in zip(dense_logits, dense):
            if in_place:
                normaliser += _cpu_contrast_exp_(logits, shift, contrast).sum(1)  # the logits now hold exp_ij
            else:
                normaliser += _normaliser(logits, shift, contrast)
        values = weighted - weight_sums * (shift + normaliser.log())
        total += torch.where(kept, coefficients * values, 0.0).sum()
        if grad is None:
            continue
        # d(-c_i n_i)/d logit_ij = c_i (W_i p_ij - w_ij), p_ij = exp_ij / normaliser_i; logit = <e_i, e_j> / tau.
        softmax_scale = torch.where(kept, coefficients * weight_sums / normaliser, 0.0) / tau
        weight_scale = coefficients / tau
        if sparse is not None:
            pair_grad = sparse_exp.mul_(softmax_scale[sparse_rows]).sub_(sparse_weights * weight_scale[sparse_rows])
            sparse.add_gradients(pair_grad, anchors, embedding, grad, rows)
        if not dense:
            continue
        # Under float16 products g goes in as g / factor, factor a bound on |g_ij| (exp_ij <= normaliser_i):
        # its entries (about coefficient / tau, 1e-7 at the paper's batch) would fall below float16's range.
        factor = None
        if source.dtype == torch.float16:
            factor = _pair_gradient_bound(coefficients, weight_sums, kept, lmbd, tau)
        inverse_factor = torch.ones((), dtype=dtype, device=device) if factor is None else 1 / factor
        for k, (logits, (columns, agnostic, specific, contrast)) in enumerate(zip(dense_logits, dense)):
            if in_place:
                pair_grad = _cpu_pair_gradient_(
                    logits, weights[k], softmax_scale, weight_scale, None if factor is None else inverse_factor,
                    source.dtype,
                )
            else:
                pair_grad = _pair_gradient(
                    logits, shift, contrast, agnostic, specific, lmbd, softmax_scale, weight_scale,
                    inverse_factor, source.dtype,
                )
            _add_dense_gradients(pair_grad, factor, source, grad, rows, columns)
    return total


def _pair_gradient_bound(
    coefficients: torch.Tensor, weight_sums: torch.Tensor, kept: torch.Tensor, lmbd: float | torch.Tensor, tau: float
) -> torch.Tensor:
    """0-dim bound on |g_ij| = |c_i (W_i p_ij - w_ij)| / tau over the anchors given, (r,) each
    (p_ij <= 1, w_ij <= 1 + |lambda|); at least 1e-30."""
    bound = (torch.where(kept, coefficients * weight_sums, 0.0) + (1 + abs(lmbd)) * coefficients.abs()) / tau
    return bound.amax().clamp_min(1e-30)


def _add_dense_gradients(
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


# On CUDA, under half-precision products and with the shared contrast pattern, the pair work runs in
# two fused Triton kernels (``triton_kernels``): nothing of size (anchors x N) but one block of the
# pair gradient is stored. False: the torch path everywhere (benchmarks time both).
TRITON_KERNELS = True
_triton_failed = False
# Rows of one block of G per embedding, at most _PAIR_GRADIENT_ELEMENTS entries. Measured on an H200:
# blocks of 1280 rows are 2 x 128 MiB at batch 64 (N = 50,176) and give the products G @ e their full
# speed there (256-row blocks: 0.113 -> 0.126 s per loss); sized by entries instead (2^26, 5,248 rows
# at batch 16), G was most of the loss's memory at batch 16 (0.34 GiB in all against 0.15 GiB).
_PAIR_GRADIENT_ROWS = 1280
_PAIR_GRADIENT_ELEMENTS = 1 << 26


def _uses_triton_kernels(inputs: PositiveInputs, matmul_dtype: torch.dtype) -> bool:
    if not TRITON_KERNELS or _triton_failed:
        return False
    if not isinstance(inputs.contrast_draw, SharedContrastPattern):
        return False  # an independent draw comes from torch's generator, which a kernel cannot replay
    device = inputs.task_agnostic.device.type
    # float32 stays with cuBLAS on CUDA: Triton's exact float32 products are slower than the separate passes.
    on_cuda = device == "cuda" and matmul_dtype in (torch.float16, torch.bfloat16)
    # Tests: Triton's interpreter runs the kernels on CPU tensors (it has no bfloat16).
    interpreted = (
        device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and matmul_dtype in (torch.float32, torch.float16)
    )
    if not (on_cuda or interpreted):
        return False
    # Imported here, not with this module: importing Triton takes about 70 MB and a second, which a
    # CPU run would spend for nothing.
    from hpseg.method import triton_kernels

    return triton_kernels.AVAILABLE


def _triton_loss_and_gradients(
    embeddings: list[torch.Tensor],
    want_grads: list[bool],
    inputs: PositiveInputs,
    lmbd: float,
    tau: float,
    scale: float,
    reweighting: bool,
    matmul_dtype: torch.dtype,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """What :func:`_loss_and_gradients` returns, the pair work done by the fused kernels.

    The per-anchor sums of the whole batch come first (one kernel); the loss and the per-anchor
    scales of the gradient follow in O(N); then, a block of anchors at a time, G_ij = g_ij + g_ji
    (second kernel) and grad_i = sum_j G_ij e_j (one product).
    """
    from hpseg.method import triton_kernels  # see _uses_triton_kernels

    dtype = torch.float32
    n, hw = inputs.n_patches, inputs.patches_per_image
    n_images = n // hw
    device = inputs.task_agnostic.device
    sources = [e.detach().to(matmul_dtype) for e in embeddings]
    pattern = inputs.contrast_draw.rows(0, hw, hw, n).to(device)  # the whole (hw, N) pattern, shape checked
    pairs = triton_kernels.PairInputs(
        inputs.task_agnostic, inputs.task_specific, inputs.agnostic_thresholds,
        inputs.specific_thresholds if lmbd != 0.0 else None, pattern, sources, tau,
    )
    counts, stats = triton_kernels.row_statistics(pairs)
    kept = counts[0] > 0
    weight_sums = counts[0].to(dtype) + lmbd * counts[1].to(dtype)
    coefficients = _image_coefficients(
        weight_sums.view(n_images, hw), kept.view(n_images, hw), scale, reweighting, n_images
    ).reshape(n)
    row_max, exp_sum, agnostic_sum, specific_sum = stats.unbind(1)  # each (2, N): z and z_mix
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)  # anchors with an empty contrast set
    values = agnostic_sum + lmbd * specific_sum - weight_sums * (shift + exp_sum.log())
    total = torch.where(kept, coefficients * values, 0.0).sum()
    grads: list[torch.Tensor | None] = [None, None]
    if not any(want_grads):
        return -total, grads
    # g_ij = c_i (W_i p_ij - w_ij) / tau, p_ij = exp(l_ij - shift_i) / exp_sum_i over C(i).
    softmax_scale = torch.where(kept, coefficients * weight_sums / exp_sum, 0.0) / tau
    scales = torch.stack([shift, softmax_scale, (coefficients / tau).expand_as(shift)], dim=1)  # (2, 3, N)
    factor = 1.0
    if matmul_dtype == torch.float16:  # G / factor: |G_ij| <= |g_ij| + |g_ji| <= factor (see _chunk_loss)
        factor = float(2 * _pair_gradient_bound(coefficients, weight_sums, kept, lmbd, tau))
    grads = [torch.zeros(e.shape, dtype=dtype, device=device) if want else None for e, want in zip(embeddings, want_grads)]
    # Blocks of G (see _PAIR_GRADIENT_ROWS), whole multiples of the kernels' largest row tile.
    align = triton_kernels.ROW_ALIGNMENT
    block = min(n, max(align, min(_PAIR_GRADIENT_ROWS, _PAIR_GRADIENT_ELEMENTS // n) // align * align))
    buffers = [torch.empty(block, n, dtype=matmul_dtype, device=device) if want else None for want in want_grads]
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        outputs = tuple(None if b is None else b[: rows.stop - rows.start] for b in buffers)
        triton_kernels.symmetric_pair_gradients(pairs, scales, rows, outputs, lmbd, 1.0 / factor)
        for grad, pair_grad, source in zip(grads, outputs, sources):
            if grad is not None:
                grad[rows].add_(pair_grad @ source, alpha=factor)  # in float32: the product times factor could underflow
    return -total, grads


def _loss_and_gradients(
    embeddings: list[torch.Tensor],
    want_grads: list[bool],
    inputs: PositiveInputs,
    lmbd: float,
    tau: float,
    scale: float,
    reweighting: bool,
    chunk_size: int,
    matmul_dtype: torch.dtype,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The loss -sum_i c_i (n_i(z) + n_i(z_mix)) and its gradients, one image at a time."""
    global _triton_failed
    if _uses_triton_kernels(inputs, matmul_dtype):
        try:
            return _triton_loss_and_gradients(embeddings, want_grads, inputs, lmbd, tau, scale, reweighting, matmul_dtype)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a compiler or driver failure: the torch path is exact
            _triton_failed = True
            warnings.warn(f"HP loss: the Triton kernels failed ({error!r}); using the torch path from now on")
    dtype = _accumulation_dtype(matmul_dtype)
    embeddings = [e.detach().to(dtype) for e in embeddings]
    grads = [torch.zeros_like(e) if want else None for e, want in zip(embeddings, want_grads)]
    sources = [e.to(matmul_dtype) for e in embeddings]  # cast once, not per image
    n_patches, hw = embeddings[0].shape[0], inputs.patches_per_image
    n_images = n_patches // hw
    total = torch.zeros((), dtype=dtype, device=embeddings[0].device)
    # Once per call (on a GPU each is a host-to-device copy), and a tensor rather than a float: the
    # compiled dense functions are not rebuilt when lambda changes.
    lmbd_tensor = torch.tensor(lmbd, dtype=dtype, device=total.device)
    # The coefficients of an image need all its anchors' masks: they come one image at a time.
    for image, masks in enumerate(image_masks(inputs, task_specific=lmbd != 0.0, chunk_size=chunk_size)):
        agnostic_counts = _count_true(masks.task_agnostic)
        kept = agnostic_counts > 0
        weight_sums = agnostic_counts.to(dtype)
        if masks.task_specific is not None:
            weight_sums += lmbd * _count_true(masks.task_specific).to(dtype)
        coefficients = _image_coefficients(weight_sums, kept, scale, reweighting, n_images)
        for first in range(0, hw, chunk_size):
            local = slice(first, min(first + chunk_size, hw))
            if not bool(kept[local].any()):
                continue
            chunk_masks = PositiveMasks(
                masks.task_agnostic[local],
                None if masks.task_specific is None else masks.task_specific[local],
                masks.contrast[local],
            )
            rows = slice(image * hw + local.start, image * hw + local.stop)
            total += _chunk_loss(
                chunk_masks, rows, kept[local], weight_sums[local], coefficients[local], embeddings, sources, grads,
                lmbd_tensor, tau, hw, matmul_dtype,
            )
    return -total, grads


class _HiddenPositiveLoss(torch.autograd.Function):
    """-sum_i c_i (n_i(z) + n_i(z_mix)); the gradients are computed along with the value."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z: torch.Tensor,
        z_mix: torch.Tensor,
        inputs: PositiveInputs,
        lmbd: float,
        tau: float,
        scale: float,
        reweighting: bool,
        chunk_size: int,
        matmul_dtype: torch.dtype,
        grad_enabled: bool,
    ) -> torch.Tensor:
        want = [grad_enabled and bool(ctx.needs_input_grad[k]) for k in range(2)]
        loss, grads = _loss_and_gradients(
            [z, z_mix], want, inputs, lmbd, tau, scale, reweighting, chunk_size, matmul_dtype
        )
        ctx.grads = grads
        ctx.dtypes = (z.dtype, z_mix.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        # Not in place: backward may run more than once on a retained graph (gradcheck does).
        grads = [
            None if grad is None else (grad * grad_output.to(grad.dtype)).to(dtype)
            for grad, dtype in zip(ctx.grads, ctx.dtypes)
        ]
        return grads[0], grads[1], None, None, None, None, None, None, None, None


def hidden_positive_loss(
    z: torch.Tensor,
    z_mix: torch.Tensor,
    task_agnostic: torch.Tensor,
    task_specific: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    *,
    patches_per_image: int,
    contrast_draw: ContrastDraw,
    lmbd: float,
    tau: float,
    tau_base: float = 0.07,
    temperature_factor: bool = True,
    reweighting: bool = True,
    chunk_size: int | None = None,
    matmul_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(sum_b L_GHP(b) + sum_b L_LHP(b)) / (2B) of spec §5, memory O(hw x N).

    The gradients of z and z_mix are computed in the forward pass (when grad mode is on and they
    require grad) and kept until backward, which only scales them.

    Args:
        z: (N, D) normalised projections of s (GHP side); receives gradient.
        z_mix: (N, D) normalised projections of s^mix (LHP side); receives gradient.
        task_agnostic: (N, C) backbone features f (normalised here; no gradient).
        task_specific: (N, D) EMA-head features s' (normalised here; no gradient).
        pool_agnostic, pool_specific: (P, C) and (P, D) reference pools.
        patches_per_image: hw; N must be a multiple of it (images one after another).
        contrast_draw: the random part of the contrast set (see ``positives``).
        lmbd: weight of task-specific positives (``lambda_schedule``).
        tau, tau_base: temperature and base temperature.
        temperature_factor: [ref quirk] scale the loss by tau / tau_base; False scales by 1.
        reweighting: weight anchors by their number of positives (omega_i of spec §5).
        chunk_size: anchors per chunk (None: a whole image, fewer when one (chunk x N) float32
            temporary would pass 256 MB).
        matmul_dtype: dtype of the dense similarity products (float16 / bfloat16 on CUDA for
            speed; there, with a ``SharedContrastPattern``, the fused Triton kernels do the pair
            work); softmax, accumulation and the sparse kernels stay in float32.
    Returns:
        Scalar loss.
    """
    if z.shape != z_mix.shape or z.shape[0] != task_agnostic.shape[0]:
        raise ValueError(
            f"z {tuple(z.shape)}, z_mix {tuple(z_mix.shape)} and task-agnostic features "
            f"{tuple(task_agnostic.shape)} must have the same number of rows"
        )
    inputs = PositiveInputs.build(
        task_agnostic, task_specific, pool_agnostic, pool_specific, patches_per_image, contrast_draw, matmul_dtype,
        task_specific_positives=lmbd != 0.0,
    )
    chunk = chunk_size or auto_chunk_size(z.shape[0], patches_per_image)
    scale = tau / tau_base if temperature_factor else 1.0
    grad_enabled = torch.is_grad_enabled() and (z.requires_grad or z_mix.requires_grad)
    return _HiddenPositiveLoss.apply(
        z, z_mix, inputs, float(lmbd), tau, scale, reweighting, chunk, matmul_dtype, grad_enabled
    )


def consistency_loss(z: torch.Tensor, z_augmented: torch.Tensor) -> torch.Tensor:
    """Mean over patches of the plain (not squared) distance ||z_i - z^aug_i||_2. Shapes: (N, D) each."""
    return F.pairwise_distance(z.float(), z_augmented.float()).mean()
