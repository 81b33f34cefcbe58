"""The HP loss written out densely: its definition, and the oracle of the tests.

Full (N, N) masks and logits, one image at a time, plain autograd: memory O(N^2), so for small
batches only. ``HiddenPositiveLoss`` computes the same value and gradients without ever holding
an (N, N) matrix (see ``hpseg.method.loss``).
"""

from __future__ import annotations

import torch

from hpseg.method.positives import ContrastDraw, hidden_positive_masks


def dense_loss(
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
) -> torch.Tensor:
    """(sum_b L_GHP(b) + sum_b L_LHP(b)) / (2B) of spec §5; the settings and arguments of ``HiddenPositiveLoss``.

    For anchor i, w_ij = 1[j in TA(i)] + lambda 1[j in TS(i)], log p_ij = l_ij - log sum_{k in C(i)}
    exp(l_ik), l_ij = <e_i, e_j> / tau, m_i = sum_j w_ij log p_ij / sum_j w_ij; per image, over the
    anchors with a task-agnostic positive, L(b) = -mean_i(f m_i omega_i), f = tau / tau_base [ref
    quirk] or 1, omega_i = W_i / mean W with reweighting, else 1. Shapes: z, z_mix (N, D);
    task_agnostic (N, C), task_specific (N, D); pools (P, C), (P, D).
    """
    hw = patches_per_image
    masks = hidden_positive_masks(task_agnostic, task_specific, pool_agnostic, pool_specific, hw, contrast_draw)
    weights = masks.task_agnostic.to(z.dtype) + lmbd * masks.task_specific.to(z.dtype)
    scale = tau / tau_base if temperature_factor else 1.0
    batch = z.shape[0] // hw
    total = z.new_zeros(())
    for embedding in (z, z_mix):
        logits = embedding @ embedding.T / tau
        log_prob = logits - logits.masked_fill(~masks.contrast, float("-inf")).logsumexp(1, keepdim=True)
        for image in range(batch):
            rows = slice(image * hw, (image + 1) * hw)
            kept = masks.task_agnostic[rows].any(1)
            if not kept.any():
                continue  # an image without any positive adds nothing (the authors' code would give NaN)
            w = weights[rows][kept]
            mean_log_prob = (w * log_prob[rows][kept]).sum(1) / w.sum(1)
            omega = w.sum(1) / w.sum(1).mean() if reweighting else 1.0
            total = total - (scale * mean_log_prob * omega).mean()
    return total / (2 * batch)
