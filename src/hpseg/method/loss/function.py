"""The public HP loss, ``hidden_positive_loss``, its autograd function, and the consistency loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpseg.method.loss.backend import LossBackend, resolve_backend
from hpseg.method.loss.terms import LossSettings
from hpseg.method.positives import ContrastDraw, PositiveInputs


class _HiddenPositiveLoss(torch.autograd.Function):
    """-sum_i c_i (n_i(z) + n_i(z_mix)); the gradients are computed along with the value."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z: torch.Tensor,
        z_mix: torch.Tensor,
        inputs: PositiveInputs,
        settings: LossSettings,
        backend: LossBackend,
        grad_enabled: bool,
    ) -> torch.Tensor:
        want = [grad_enabled and bool(ctx.needs_input_grad[k]) for k in range(2)]
        loss, grads = backend.loss_and_gradients([z, z_mix], want, inputs, settings)
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
        return grads[0], grads[1], None, None, None, None


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
    backend: LossBackend | str = "auto",
    anchor_images: range | None = None,
) -> torch.Tensor:
    """(sum_b L_GHP(b) + sum_b L_LHP(b)) / (2B) of spec §5, memory O(hw x N).

    The gradients of z and z_mix are computed in the forward pass (when grad mode is on and they
    require grad) and kept until backward, which only scales them. ``loss.reference.reference_loss``
    is the same loss written out densely.

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
        chunk_size: anchors per chunk of the torch path (None: a whole image, fewer when one
            (chunk x N) float32 temporary would pass 256 MB).
        matmul_dtype: dtype of the similarity products (float16 / bfloat16 on CUDA for speed);
            softmax, accumulation and the sparse path stay in float32.
        backend: a ``LossBackend`` or its name (see there); ``"auto"``: the Triton kernels on
            CUDA under half-precision products with a ``SharedContrastPattern``, the torch path
            otherwise.
        anchor_images: sum the terms of these images' anchors only (None: every image), still
            against all N patches and normalised by all N / hw images: the share of one rank of a
            gathered global batch (``hpseg.training.distributed``); the shares of a partition of
            the images add up to the loss and gradients of the whole batch.
    Returns:
        Scalar loss (the share of ``anchor_images``).
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
    scale = tau / tau_base if temperature_factor else 1.0
    settings = LossSettings(float(lmbd), tau, scale, reweighting, chunk_size, matmul_dtype, anchor_images)
    grad_enabled = torch.is_grad_enabled() and (z.requires_grad or z_mix.requires_grad)
    return _HiddenPositiveLoss.apply(z, z_mix, inputs, settings, resolve_backend(backend), grad_enabled)


def consistency_loss(z: torch.Tensor, z_augmented: torch.Tensor) -> torch.Tensor:
    """Mean over patches of the plain (not squared) distance ||z_i - z^aug_i||_2. Shapes: (N, D) each."""
    return F.pairwise_distance(z.float(), z_augmented.float()).mean()
