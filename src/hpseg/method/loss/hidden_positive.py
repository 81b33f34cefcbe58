"""The HP loss as a module built from its settings (``HiddenPositiveLoss``), its autograd function,
and the consistency loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpseg.config import MethodConfig
from hpseg.method.loss.backend import LossBackend
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


class HiddenPositiveLoss(torch.nn.Module):
    """(sum_b L_GHP(b) + sum_b L_LHP(b)) / (2B) of spec §5, memory O(hw x N).

    Holds the loss's settings and its ``LossBackend`` (with what the backend learns as it runs: a
    failure of the Triton kernels, its compiled functions); what changes from step to step (lambda,
    the contrast draw, the product dtype, a rank's anchors) comes with each call. The gradients of
    z and z_mix are computed in the forward pass (when grad mode is on and they require grad) and
    kept until backward, which only scales them. ``loss.definition.dense_loss`` is the same loss
    written out densely.

    Args:
        tau, tau_base: temperature and base temperature.
        temperature_factor: [ref quirk] scale the loss by tau / tau_base; False scales by 1.
        reweighting: weight anchors by their number of positives (omega_i of spec §5).
        chunk_size: anchors per chunk of the torch path (None: a whole image, fewer when one
            (chunk x N) float32 temporary would pass 256 MB).
        backend: a ``LossBackend`` or its name (see there); ``"auto"``: the Triton kernels on
            CUDA under half-precision products with a ``SharedContrastPattern``, the torch path
            otherwise.
    """

    def __init__(
        self,
        tau: float,
        *,
        tau_base: float = 0.07,
        temperature_factor: bool = True,
        reweighting: bool = True,
        chunk_size: int | None = None,
        backend: LossBackend | str = "auto",
    ) -> None:
        super().__init__()
        self.tau, self.tau_base = tau, tau_base
        self.temperature_factor, self.reweighting, self.chunk_size = temperature_factor, reweighting, chunk_size
        self.backend = backend if isinstance(backend, LossBackend) else LossBackend(backend)

    @classmethod
    def from_config(cls, method: MethodConfig, backend: LossBackend | None = None) -> HiddenPositiveLoss:
        """The loss of a run's ``method`` section; ``backend`` (a benchmark's) replaces ``method.loss_backend``."""
        return cls(
            method.tau, tau_base=method.tau_base, temperature_factor=method.temperature_factor,
            reweighting=method.reweighting, chunk_size=method.chunk_size or None,
            backend=backend or LossBackend(method.loss_backend),
        )

    def forward(
        self,
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
        matmul_dtype: torch.dtype = torch.float32,
        anchor_images: range | None = None,
    ) -> torch.Tensor:
        """The loss of one batch (the share of ``anchor_images``), a scalar.

        Args:
            z: (N, D) normalised projections of s (GHP side); receives gradient.
            z_mix: (N, D) normalised projections of s^mix (LHP side); receives gradient.
            task_agnostic: (N, C) backbone features f (normalised here; no gradient).
            task_specific: (N, D) EMA-head features s' (normalised here; no gradient).
            pool_agnostic, pool_specific: (P, C) and (P, D) threshold pools (``method.pools``).
            patches_per_image: hw; N must be a multiple of it (images one after another).
            contrast_draw: the random part of the contrast set (see ``positives``).
            lmbd: weight of task-specific positives (``lambda_schedule``).
            matmul_dtype: dtype of the similarity products (float16 / bfloat16 on CUDA for speed);
                softmax, accumulation and the sparse path stay in float32.
            anchor_images: sum the terms of these images' anchors only (None: every image), still
                against all N patches and normalised by all N / hw images: the share of one rank of
                a gathered global batch (``hpseg.training.distributed``); the shares of a partition
                of the images add up to the loss and gradients of the whole batch.
        """
        if z.shape != z_mix.shape or z.shape[0] != task_agnostic.shape[0]:
            raise ValueError(
                f"z {tuple(z.shape)}, z_mix {tuple(z_mix.shape)} and task-agnostic features "
                f"{tuple(task_agnostic.shape)} must have the same number of rows"
            )
        inputs = PositiveInputs.build(
            task_agnostic, task_specific, pool_agnostic, pool_specific, patches_per_image, contrast_draw,
            matmul_dtype, task_specific_positives=lmbd != 0.0,
        )
        scale = self.tau / self.tau_base if self.temperature_factor else 1.0
        settings = LossSettings(float(lmbd), self.tau, scale, self.reweighting, self.chunk_size, matmul_dtype,
                                anchor_images)
        grad_enabled = torch.is_grad_enabled() and (z.requires_grad or z_mix.requires_grad)
        return _HiddenPositiveLoss.apply(z, z_mix, inputs, settings, self.backend, grad_enabled)


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
    """``HiddenPositiveLoss(tau, ...)(z, ...)`` in one call, for a single evaluation (tests,
    benchmarks): a backend named here is new to this call, so nothing it learns outlives it."""
    loss = HiddenPositiveLoss(tau, tau_base=tau_base, temperature_factor=temperature_factor,
                              reweighting=reweighting, chunk_size=chunk_size, backend=backend)
    return loss(z, z_mix, task_agnostic, task_specific, pool_agnostic, pool_specific,
                patches_per_image=patches_per_image, contrast_draw=contrast_draw, lmbd=lmbd,
                matmul_dtype=matmul_dtype, anchor_images=anchor_images)


def consistency_loss(z: torch.Tensor, z_augmented: torch.Tensor) -> torch.Tensor:
    """Mean over patches of the plain (not squared) distance ||z_i - z^aug_i||_2. Shapes: (N, D) each."""
    return F.pairwise_distance(z.float(), z_augmented.float()).mean()
