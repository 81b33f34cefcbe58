"""One HP training step (spec §6) as a function of tensors: the seam the trainer and the
golden test of the authors' loop (tests/test_golden_steps.py) share.

``training_step(learner, inputs, pools, contrast_draw, lmbd)``: f, LHP weights (and the
photometric view's features) -> S, S' (EMA), s^mix -> z, z^mix -> GHP + LHP loss
(+ α · consistency, + online probes) -> AdamW / Adam steps with gradient clipping on S -> EMA
update. Everything random besides channel dropout (the contrast draw) comes in as an argument.
A non-finite loss updates nothing: the caller sees it in the values and stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpseg.config import Config, MethodConfig
from hpseg.method import (
    ContrastDraw,
    HiddenPositiveLoss,
    HiddenPositivesModel,
    IndependentContrastDraw,
    LossBackend,
    SharedContrastPattern,
    consistency_loss,
    propagate_to_neighbours,
    to_rows,
)
from hpseg.runtime import DistributedContext, autocast, average_gradients, make_grad_scaler
from hpseg.training import distributed
from hpseg.training.features import StepInputs
from hpseg.training.pools import ThresholdPools


@dataclass
class Learner:
    """What a training step updates (the heads and probes, their optimisers and the grad scaler)
    and the HP loss it computes (with its backend)."""

    model: HiddenPositivesModel
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    loss: HiddenPositiveLoss
    method: MethodConfig
    grad_clip: float
    device: torch.device
    amp_dtype: torch.dtype | None
    context: DistributedContext
    positives: str = "global"  # train.positives: under torchrun, positives among the global batch or the rank's


def build_learner(config: Config, feature_dim: int, device: torch.device, amp_dtype: torch.dtype | None,
                  context: DistributedContext | None = None, loss_backend: LossBackend | None = None) -> Learner:
    """The model of a run with feature width C = ``feature_dim``, on ``device``, its optimisers
    (AdamW on S; Adam on P and on each probe, as the authors) and its loss (``loss_backend``, a
    benchmark's, replaces ``method.loss_backend``)."""
    method, optim = config.method, config.optim
    model = HiddenPositivesModel(feature_dim, method.dim, method.n_classes, method.dropout,
                                 n_clusters=config.n_clusters).to(device)
    optimizers: dict[str, torch.optim.Optimizer] = {
        "segmentation": torch.optim.AdamW(
            model.segmentation.parameters(), lr=optim.head_lr, weight_decay=optim.head_weight_decay
        ),
        "projection": torch.optim.Adam(model.projection.parameters(), lr=optim.projection_lr),
        "linear_probe": torch.optim.Adam(model.linear_probe.parameters(), lr=optim.linear_lr),
        "cluster_probe": torch.optim.Adam(model.cluster_probe.parameters(), lr=optim.cluster_lr),
    }
    scaler = make_grad_scaler(config.train.grad_scaler, device, enabled=amp_dtype == torch.float16)
    loss = HiddenPositiveLoss.from_config(method, loss_backend)
    return Learner(model, optimizers, scaler, loss, method, optim.grad_clip, device, amp_dtype,
                   context or DistributedContext(), config.train.positives)


def draw_contrast(method: MethodConfig, patches_per_image: int, n_patches: int, generator: torch.Generator,
                  device: torch.device) -> ContrastDraw:
    """A step's random part of the contrast sets for (hw, N) pairs (``method.contrast_draw``)."""
    if method.contrast_draw == "shared":
        return SharedContrastPattern.draw(patches_per_image, n_patches, method.rho, generator, device)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=device))
    return IndependentContrastDraw(method.rho, seed, device)


@dataclass
class _Embeddings:
    """A step's forward pass: s (B, D, h, w), z and z^mix (N, D), f and s' rows as the loss uses them."""

    segmentation: torch.Tensor
    z: torch.Tensor
    z_mix: torch.Tensor
    agnostic_rows: torch.Tensor
    specific_rows: torch.Tensor


def _embed(model: HiddenPositivesModel, method: MethodConfig, inputs: StepInputs) -> _Embeddings:
    features = inputs.features.float()
    segmentation = model.segmentation(features)
    with torch.no_grad():
        # [ref quirk] S' sees channel dropout on its input like S (train mode).
        model.ema_segmentation.train(method.similarity_dropout)
        specific = model.ema_segmentation(features)
    mixed = propagate_to_neighbours(segmentation, inputs.neighbour_weights)
    agnostic = features
    if method.similarity_dropout:
        # [ref quirk] a further dropout draw on f, s' and s^mix as the losses use them.
        agnostic = F.dropout2d(agnostic, method.dropout, training=True)
        specific = F.dropout2d(specific, method.dropout, training=True)
        mixed = F.dropout2d(mixed, method.dropout, training=True)
    z = model.projection(to_rows(segmentation))
    z_mix = model.projection(to_rows(mixed))
    return _Embeddings(segmentation, z, z_mix, to_rows(agnostic.float()), to_rows(specific.float()))


def _consistency(model: HiddenPositivesModel, method: MethodConfig, z: torch.Tensor,
                 features_aug: torch.Tensor | None) -> torch.Tensor | None:
    """Distance between z and the photometric view's projections (spec §5); None (not computed)
    when α = 0: a 0 would claim that the two views agree."""
    if method.alpha <= 0 or features_aug is None:
        return None
    z_aug = model.projection(to_rows(model.segmentation(features_aug.float())))
    return consistency_loss(z, z_aug)


def _hidden_positive_loss(learner: Learner, embedded: _Embeddings, pools: ThresholdPools, hw: int,
                          contrast_draw: ContrastDraw, lmbd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The HP loss of the step and what this rank back-propagates for it (the same in one process).

    Global positives under torchrun (``hpseg.training.distributed``): the loss of the global batch,
    and W x this rank's share of it (its anchors against all N patches), whose gradients averaged
    over the ranks are the whole loss's.
    """
    device, amp, context = learner.device, learner.amp_dtype, learner.context
    rows = (embedded.z, embedded.z_mix, embedded.agnostic_rows, embedded.specific_rows)
    anchor_images = None
    if context.enabled and learner.positives == "global":
        anchor_images = distributed.rank_images(embedded.segmentation.shape[0], context)
        rows = (*(distributed.gather_with_gradients(r, context) for r in rows[:2]),
                *(distributed.gather_rows(r, context) for r in rows[2:]))
    share = learner.loss(
        *rows, pools.agnostic, pools.specific, patches_per_image=hw, contrast_draw=contrast_draw, lmbd=lmbd,
        matmul_dtype=amp if device.type == "cuda" and amp else torch.float32, anchor_images=anchor_images,
    )
    if anchor_images is None:
        return share, share
    return distributed.sum_over_ranks(share, context), share * context.world_size


def _optimise(learner: Learner, total: torch.Tensor) -> torch.Tensor:
    """Backward, gradient averaging across ranks, clipping of S's gradient, one step of every
    optimiser. Returns the norm of S's gradient before clipping."""
    model, scaler = learner.model, learner.scaler
    for optimizer in learner.optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    average_gradients([p for p in model.parameters() if p.requires_grad], learner.context)
    for optimizer in learner.optimizers.values():
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.segmentation.parameters(), learner.grad_clip)
    for optimizer in learner.optimizers.values():
        scaler.step(optimizer)
    scaler.update()
    return grad_norm


def training_step(learner: Learner, inputs: StepInputs, pools: ThresholdPools, contrast_draw: ContrastDraw,
                  lmbd: float) -> dict[str, float]:
    """One step on a batch of B crops of an h × w patch grid (N = B·h·w patches).

    Args:
        inputs: f (B, C, h, w), LHP weights (B, h·w, 9), labels (B, H, W), photometric f (B, C, h, w) or None.
        pools: the threshold pools of this step.
        contrast_draw: the random part of the contrast sets, for (h·w, N); under torchrun with
            global positives B is this rank's share and N counts the patches of the global batch.
        lmbd: λ of this step (``lambda_schedule``).
    Returns:
        ``loss`` (total), ``hp`` (GHP + LHP, of the global batch), ``consistency`` (before α;
        absent when α = 0: not computed), ``linear_probe``, ``cluster_probe`` (these three of this
        rank's images) and ``grad_norm`` (S's gradient norm before clipping). When ``loss`` is not
        finite no weight, moment or EMA changes and ``grad_norm`` is NaN.
    """
    model, method = learner.model, learner.method
    model.train()
    hw = inputs.features.shape[-2] * inputs.features.shape[-1]
    with autocast(learner.device, learner.amp_dtype):
        embedded = _embed(model, method, inputs)
        consistency = _consistency(model, method, embedded.z, inputs.features_aug)
        detached = embedded.segmentation.detach().float()
        linear = model.linear_probe.loss(detached, inputs.labels)
        cluster = model.cluster_probe.loss(detached)
    # Outside autocast: the loss picks its own product dtype and keeps softmax in float32.
    hp, hp_backward = _hidden_positive_loss(learner, embedded, pools, hw, contrast_draw, lmbd)
    others = linear + cluster if consistency is None else method.alpha * consistency + linear + cluster
    values = {"loss": (hp + others).item(), "hp": hp.item(), "linear_probe": linear.item(),
              "cluster_probe": cluster.item()}
    if consistency is not None:
        values["consistency"] = consistency.item()
    if not math.isfinite(values["loss"]):
        return {**values, "grad_norm": math.nan}
    # The EMA follows S before this step's update, as in the authors' code.
    model.update_ema(method.ema_momentum)
    values["grad_norm"] = _optimise(learner, hp_backward + others).item()
    return values


def specific_pool_maps(model: HiddenPositivesModel, method: MethodConfig, features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) backbone features -> (B, D, h, w) S' features as the task-specific pool takes them."""
    head = model.ema_segmentation
    head.train(method.similarity_dropout)
    return pool_dropout(method, head(features.float()))


def pool_dropout(method: MethodConfig, maps: torch.Tensor) -> torch.Tensor:
    """[ref quirk] the authors fill their pools in training mode: the same channel dropout as the
    similarity features of a step (similarity_dropout=False: clean features)."""
    return F.dropout2d(maps, method.dropout, training=True) if method.similarity_dropout else maps
