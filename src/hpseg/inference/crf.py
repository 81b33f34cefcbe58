"""Dense-CRF refinement from torch scores (spec §8): probabilities at the image size, batches.

The CRF itself, on numpy arrays and without torch (so that worker processes need not import
torch), is :mod:`hpseg.inference.crf_numpy`, whose names this module exports too.

Shapes: images are ``(H, W, 3)`` uint8 RGB (single) or ``(B, 3, H, W)`` uint8 (batch);
probabilities ``(K, H, W)`` / ``(B, K, h, w)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hpseg.backbones.registry import IMAGENET_MEAN, IMAGENET_STD
from hpseg.inference.crf_numpy import (
    BILATERAL_COMPAT,
    BILATERAL_SRGB,
    BILATERAL_SXY,
    GAUSSIAN_COMPAT,
    GAUSSIAN_SXY,
    N_ITER,
    CRFUnavailableError,
    crf_available,
    dense_crf,
    require_crf,
)

__all__ = [
    "BILATERAL_COMPAT",
    "BILATERAL_SRGB",
    "BILATERAL_SXY",
    "GAUSSIAN_COMPAT",
    "GAUSSIAN_SXY",
    "N_ITER",
    "CRFUnavailableError",
    "cluster_probabilities",
    "crf_available",
    "crf_probabilities",
    "crf_refine_batch",
    "dense_crf",
    "images_to_uint8",
    "require_crf",
]


def cluster_probabilities(cosine: Tensor, scale: float = 2.0, *, log: bool = False) -> Tensor:
    """Cluster probabilities ``softmax(scale * cosine)`` along dim 1 (spec §8 uses scale 2).

    Args:
        cosine: ``(B, K, H, W)`` cosine similarities between pixel codes and the K centroids.
        scale: inverse temperature.
        log: return log-probabilities (``log_softmax``) instead.

    Returns:
        ``(B, K, H, W)`` float32 tensor.
    """
    z = cosine.float() * scale
    return F.log_softmax(z, dim=1) if log else F.softmax(z, dim=1)


def images_to_uint8(
    images: Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Tensor:
    """Undo ImageNet-style normalisation: ``(B, 3, H, W)`` float -> ``(B, 3, H, W)`` uint8."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    x = images.float() * s + m
    # round() rather than truncation, to match PIL's to-uint8 conversion of [0, 1] floats closely.
    return (x * 255.0).round().clamp_(0, 255).to(torch.uint8)


def crf_refine_batch(
    images_uint8: Tensor,
    logits_or_probs: Tensor,
    *,
    from_logits: bool = True,
    n_iter: int = N_ITER,
    **params: float,
) -> Tensor:
    """Upsample, normalise and CRF-refine a batch.

    Args:
        images_uint8: ``(B, 3, H, W)`` uint8 RGB images (see :func:`images_to_uint8`).
        logits_or_probs: ``(B, K, h, w)`` scores at any resolution. With ``from_logits``
            (default) they are logits or log-probabilities: upsampled bilinearly to ``(H, W)``
            then softmaxed, as the reference does. Otherwise they are probabilities, upsampled
            bilinearly (a convex combination, so they stay normalised).
        n_iter: mean-field iterations.
        **params: overrides of :func:`dense_crf`'s kernel parameters.

    Returns:
        ``(B, K, H, W)`` float32 refined probabilities on ``logits_or_probs``' device.
    """
    if images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images_uint8.shape)}")
    if images_uint8.dtype != torch.uint8:
        raise ValueError(
            f"images must be uint8 RGB, got {images_uint8.dtype}; use images_to_uint8() to undo normalisation"
        )
    if logits_or_probs.ndim != 4 or logits_or_probs.shape[0] != images_uint8.shape[0]:
        raise ValueError(
            f"logits_or_probs must be (B, K, h, w) with B = {images_uint8.shape[0]}, "
            f"got {tuple(logits_or_probs.shape)}"
        )
    require_crf()
    probs = crf_probabilities(logits_or_probs, tuple(images_uint8.shape[-2:]), from_logits=from_logits)
    images_np = images_uint8.detach().permute(0, 2, 3, 1).cpu().numpy()
    refined = [dense_crf(image, image_probs, n_iter, **params) for image, image_probs in zip(images_np, probs)]
    return torch.from_numpy(np.stack(refined)).to(logits_or_probs.device)


def crf_probabilities(logits_or_probs: Tensor, size: tuple[int, int], *, from_logits: bool = True) -> np.ndarray:
    """(B, K, h, w) scores -> (B, K, H, W) float32 numpy probabilities at ``size``, the CRF's input:
    logits (or log-probabilities) upsampled bilinearly then softmaxed, as the reference does;
    probabilities (``from_logits=False``) only upsampled (a convex combination stays normalised)."""
    with torch.no_grad():
        # float32 first: under autocast the scores may be float16.
        scores = logits_or_probs.detach().float()
        if tuple(scores.shape[-2:]) != tuple(size):
            scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        probs = F.softmax(scores, dim=1) if from_logits else scores
        return probs.cpu().numpy()
