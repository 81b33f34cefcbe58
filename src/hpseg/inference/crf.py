"""Optional dense-CRF refinement of segmentation probabilities (spec §8).

The fully connected CRF of Krähenbühl & Koltun refines per-pixel class probabilities with an
appearance (bilateral) kernel and a smoothness (Gaussian) kernel. The spec's parameters, used
as defaults here: 10 mean-field iterations; Gaussian kernel ``sxy=1, compat=3``; bilateral
kernel ``sxy=67, srgb=3, compat=4``. Papers report their numbers after this step.

The CRF needs the compiled ``pydensecrf`` module, which is *optional*: install it with
``pip install "hpseg[crf]"`` (the ``pydensecrf2`` distribution; the original ``pydensecrf``
1.0rc3 often fails to build). Without it, :func:`dense_crf` raises
:class:`CRFUnavailableError`; everything else in hpseg works.

Shapes: images are ``(H, W, 3)`` uint8 RGB (single) or ``(B, 3, H, W)`` uint8 (batch);
probabilities ``(K, H, W)`` / ``(B, K, h, w)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hpseg.backbones.registry import IMAGENET_MEAN, IMAGENET_STD
from hpseg.errors import HpsegError

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
    "crf_refine_batch",
    "dense_crf",
    "images_to_uint8",
    "require_crf",
]

# Spec §8 parameters (identical to the reference implementation's).
N_ITER = 10
GAUSSIAN_SXY = 1.0
GAUSSIAN_COMPAT = 3.0
BILATERAL_SXY = 67.0
BILATERAL_SRGB = 3.0
BILATERAL_COMPAT = 4.0
# Probabilities are clipped before the log so that a zero never becomes an infinite unary.
PROB_CLIP = 1e-5

_INSTALL_HINT = (
    "dense CRF refinement needs the optional pydensecrf module: install it with "
    'pip install "hpseg[crf]" (this installs the pydensecrf2 package; the import name is '
    "pydensecrf). Note that the original pydensecrf 1.0rc3 package often fails to build; "
    "use pydensecrf2 instead."
)


class CRFUnavailableError(HpsegError, ImportError):
    """Raised when dense CRF is requested but ``pydensecrf`` cannot be imported."""

    def __init__(self, message: str = _INSTALL_HINT) -> None:
        super().__init__(message)


def _import_densecrf() -> Any:
    """Import ``pydensecrf.densecrf``: lazily, because it is an optional compiled extra and hpseg
    must import (and run without the CRF) where it is missing."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as err:  # ModuleNotFoundError, or a broken build's missing symbol
        raise CRFUnavailableError(f"{_INSTALL_HINT} (import failed: {err})") from err
    return dcrf


def require_crf() -> None:
    """Raise :class:`CRFUnavailableError` (with the install hint) now, before any work, when
    the CRF is asked for but ``pydensecrf`` is missing."""
    _import_densecrf()


def crf_available() -> bool:
    """True when ``pydensecrf`` imports (the ``hpseg[crf]`` extra is installed)."""
    try:
        _import_densecrf()
    except CRFUnavailableError:
        return False
    return True


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    n_iter: int = N_ITER,
    *,
    gaussian_sxy: float = GAUSSIAN_SXY,
    gaussian_compat: float = GAUSSIAN_COMPAT,
    bilateral_sxy: float = BILATERAL_SXY,
    bilateral_srgb: float = BILATERAL_SRGB,
    bilateral_compat: float = BILATERAL_COMPAT,
) -> np.ndarray:
    """Refine one image's class probabilities with a fully connected CRF.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image (the bilateral kernel is isotropic in colour, so
            RGB and BGR give the same result).
        probs: ``(K, H, W)`` float probabilities (each pixel sums to 1) at the image's size.
        n_iter: mean-field iterations (spec: 10).

    Returns:
        ``(K, H, W)`` float32 refined probabilities.

    Raises:
        CRFUnavailableError: ``pydensecrf`` is not installed.
        ValueError: shapes or dtype do not match.
    """
    dcrf = _import_densecrf()
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (K, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}")
    n_labels, height, width = probs.shape
    # Unary = negative log-probability; the C++ side wants C-contiguous float32 (K, H*W).
    unary = -np.log(np.clip(probs.astype(np.float32), PROB_CLIP, 1.0)).reshape(n_labels, -1)
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image), compat=bilateral_compat
    )
    q = crf.inference(int(n_iter))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)


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
    device = logits_or_probs.device
    height, width = images_uint8.shape[-2:]
    with torch.no_grad():
        # float32 first: under autocast the scores may be float16.
        scores = logits_or_probs.detach().float()
        if scores.shape[-2:] != (height, width):
            scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
        probs = F.softmax(scores, dim=1) if from_logits else scores
        probs_np = probs.cpu().numpy()
    images_np = images_uint8.detach().permute(0, 2, 3, 1).cpu().numpy()
    refined = [dense_crf(image, image_probs, n_iter, **params) for image, image_probs in zip(images_np, probs_np)]
    return torch.from_numpy(np.stack(refined)).to(device)
