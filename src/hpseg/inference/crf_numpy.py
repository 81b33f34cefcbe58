"""The dense CRF on numpy arrays, without torch: what the CRF worker processes import (spec §8).

The fully connected CRF of Krähenbühl & Koltun refines per-pixel class probabilities with an
appearance (bilateral) kernel and a smoothness (Gaussian) kernel. The spec's parameters, used
as defaults here: 10 mean-field iterations; Gaussian kernel ``sxy=1, compat=3``; bilateral
kernel ``sxy=67, srgb=3, compat=4``. Papers report their numbers after this step.

The CRF needs the compiled ``pydensecrf`` module, which is *optional*: install it with
``pip install "hpseg[crf]"`` (the ``pydensecrf2`` distribution; the original ``pydensecrf``
1.0rc3 often fails to build). Without it, :func:`dense_crf` raises
:class:`CRFUnavailableError`; everything else in hpseg works. :mod:`hpseg.inference.crf` has
the torch side (probabilities from scores, batches) and exports these names too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpseg.errors import HpsegError

__all__ = [
    "BILATERAL_COMPAT",
    "BILATERAL_SRGB",
    "BILATERAL_SXY",
    "GAUSSIAN_COMPAT",
    "GAUSSIAN_SXY",
    "N_ITER",
    "CRFUnavailableError",
    "crf_available",
    "dense_crf",
    "refine_labels",
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


def refine_labels(image: np.ndarray, probabilities: list[np.ndarray]) -> list[np.ndarray]:
    """One image's CRF-refined label maps: ``(H, W, 3)`` uint8 image, a list of ``(K, H, W)``
    float32 probability maps (one per head) -> a list of ``(H, W)`` int64 argmax label maps."""
    return [dense_crf(image, probs).argmax(0).astype(np.int64) for probs in probabilities]
