"""The HP losses (spec §5): GHP and LHP contrastive terms, and the consistency loss.

For anchor i with positive weights w_ij = 1[j in TA(i)] + lambda 1[j in TS(i)] and contrast
set C(i), the per-anchor quantity is

    n_i(z) = sum_j w_ij log p_ij,   log p_ij = <z_i, z_j>/tau - log sum_{k in C(i)} exp(<z_i, z_k>/tau)

(the reference subtracts max_k <z_i, z_k>/tau first; it cancels in log p and only serves
stability, which logsumexp gives here). With m_i = n_i / W_i, W_i = sum_j w_ij and, per image,
omega_i = W_i / mean over kept anchors of W, the image loss -mean_i(f m_i omega_i) over the
kept anchors (those with a task-agnostic positive) equals

    L(b) = -f * sum_{i kept} n_i / sum_{i kept} W_i                 (reweighting)
    L(b) = -f * mean_{i kept} n_i / W_i                            (no reweighting)

with f = tau / tau_base [ref quirk] or 1. So the loss is linear in n_i with coefficients that
depend on the masks only, which is what lets the backward pass recompute one chunk of anchors
at a time: memory stays O(chunk x N) instead of the reference's O(hw x N) per image, kept alive
for every image until backward.

Peak memory at the paper's scale (batch 64, ViT-S/8: N = 50,176, D = 512, C = 384), float32,
automatic chunk of 334 anchors: inputs and gradients about 0.6 GB plus about 0.35 GB of
chunk temporaries — about 1 GB in all (measured in ``benchmarks/loss_benchmark.py``), against
tens of GB for storing the (hw x N) matrices of every image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpseg.method.positives import ContrastDraw, PositiveInputs, PositiveMasks

# A chunk's (chunk x N) temporaries hold about this many elements each.
_CHUNK_ELEMENTS = 1 << 24


def auto_chunk_size(n_patches: int) -> int:
    """Anchors per chunk so that one (chunk x N) float32 matrix takes about 64 MB."""
    return max(1, min(n_patches, _CHUNK_ELEMENTS // max(1, n_patches)))


def _positive_weights(masks: PositiveMasks, lmbd: float, dtype: torch.dtype) -> torch.Tensor:
    """(chunk, N) w_ij = 1[j in TA(i)] + lambda 1[j in TS(i)]; TS is not read while lambda = 0."""
    weights = masks.task_agnostic.to(dtype)
    if lmbd != 0.0:
        weights = weights + lmbd * masks.task_specific.to(dtype)
    return weights


def _accumulation_dtype(matmul_dtype: torch.dtype) -> torch.dtype:
    # Softmax and sums stay in float32 under half-precision products; float64 (gradcheck) stays float64.
    return torch.float64 if matmul_dtype == torch.float64 else torch.float32


def _logits(embeddings: torch.Tensor, start: int, stop: int, tau: float, dtype: torch.dtype) -> torch.Tensor:
    """(stop - start, N) <z_i, z_j> / tau for the anchors of the chunk."""
    product = embeddings[start:stop].to(dtype) @ embeddings.to(dtype).T
    return product.to(_accumulation_dtype(dtype)) / tau


class _HiddenPositiveLoss(torch.autograd.Function):
    """sum_i coefficient_i * (n_i(z) + n_i(z_mix)), recomputing each anchor chunk in backward."""

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
    ) -> torch.Tensor:
        n_patches = z.shape[0]
        hw = inputs.patches_per_image
        accumulate = _accumulation_dtype(matmul_dtype)
        numerators = torch.zeros(n_patches, device=z.device, dtype=accumulate)
        weight_sums = torch.zeros(n_patches, device=z.device, dtype=accumulate)
        kept = torch.zeros(n_patches, dtype=torch.bool, device=z.device)
        for start in range(0, n_patches, chunk_size):
            stop = min(start + chunk_size, n_patches)
            masks = inputs.masks(start, stop)
            weights = _positive_weights(masks, lmbd, accumulate)
            weight_sums[start:stop] = weights.sum(1)
            kept[start:stop] = masks.task_agnostic.any(1)
            for embeddings in (z, z_mix):
                logits = _logits(embeddings, start, stop, tau, matmul_dtype)
                log_normaliser = logits.masked_fill(~masks.contrast, float("-inf")).logsumexp(1)
                value = (weights * logits).sum(1) - weight_sums[start:stop] * log_normaliser
                numerators[start:stop] += torch.where(kept[start:stop], value, torch.zeros_like(value))

        kept_per_image = kept.view(-1, hw)
        weights_per_image = torch.where(kept, weight_sums, torch.zeros_like(weight_sums)).view(-1, hw)
        if reweighting:
            denominators = weights_per_image.sum(1, keepdim=True).expand(-1, hw)
        else:
            denominators = weight_sums.view(-1, hw) * kept_per_image.sum(1, keepdim=True)
        # Anchors without a task-agnostic positive are skipped; an image with none adds nothing
        # (the reference would produce NaN there).
        coefficients = torch.where(kept_per_image, scale / denominators.clamp_min(1e-12), 0.0).reshape(-1)
        coefficients = coefficients / (2 * kept_per_image.shape[0])

        ctx.save_for_backward(z, z_mix, coefficients, weight_sums, kept)
        ctx.inputs = inputs
        ctx.settings = (lmbd, tau, chunk_size, matmul_dtype)
        return -(coefficients * numerators).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        z, z_mix, coefficients, weight_sums, kept = ctx.saved_tensors
        inputs: PositiveInputs = ctx.inputs
        lmbd, tau, chunk_size, matmul_dtype = ctx.settings
        accumulate = _accumulation_dtype(matmul_dtype)
        grads = [torch.zeros(z.shape, device=z.device, dtype=accumulate) for _ in range(2)]
        n_patches = z.shape[0]
        for start in range(0, n_patches, chunk_size):
            stop = min(start + chunk_size, n_patches)
            active = kept[start:stop]
            if not bool(active.any()):
                continue
            masks = inputs.masks(start, stop)
            weights = _positive_weights(masks, lmbd, accumulate)
            row_coefficient = (-coefficients[start:stop] * grad_output.to(accumulate))[:, None] / tau
            for embeddings, grad in zip((z, z_mix), grads):
                logits = _logits(embeddings, start, stop, tau, matmul_dtype)
                probabilities = logits.masked_fill(~masks.contrast, float("-inf")).softmax(1)
                probabilities = torch.where(active[:, None], probabilities, 0.0)
                # d n_i / d logit_ij = w_ij - W_i p_ij; logit_ij = <z_i, z_j> / tau.
                pair_grad = (row_coefficient * (weights - weight_sums[start:stop, None] * probabilities)).to(
                    matmul_dtype
                )
                source = embeddings.to(matmul_dtype)
                grad[start:stop] += (pair_grad @ source).to(accumulate)
                grad += (pair_grad.T @ source[start:stop]).to(accumulate)
        return grads[0].to(z.dtype), grads[1].to(z_mix.dtype), None, None, None, None, None, None, None


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
    """(sum_b L_GHP(b) + sum_b L_LHP(b)) / (2B) of spec §5, memory O(chunk x N).

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
        chunk_size: anchors per chunk (None: about 64 MB per chunk temporary).
        matmul_dtype: dtype of the similarity products (float16 / bfloat16 on CUDA for speed;
            softmax and accumulation stay in float32).
    Returns:
        Scalar loss.
    """
    if z.shape != z_mix.shape or z.shape[0] != task_agnostic.shape[0]:
        raise ValueError(
            f"z {tuple(z.shape)}, z_mix {tuple(z_mix.shape)} and task-agnostic features "
            f"{tuple(task_agnostic.shape)} must have the same number of rows"
        )
    inputs = PositiveInputs.build(
        task_agnostic, task_specific, pool_agnostic, pool_specific, patches_per_image, contrast_draw, matmul_dtype
    )
    chunk = chunk_size or auto_chunk_size(z.shape[0])
    scale = tau / tau_base if temperature_factor else 1.0
    return _HiddenPositiveLoss.apply(z, z_mix, inputs, float(lmbd), tau, scale, reweighting, chunk, matmul_dtype)


def consistency_loss(z: torch.Tensor, z_augmented: torch.Tensor) -> torch.Tensor:
    """Mean over patches of the plain (not squared) distance ||z_i - z^aug_i||_2. Shapes: (N, D) each."""
    return F.pairwise_distance(z.float(), z_augmented.float()).mean()
