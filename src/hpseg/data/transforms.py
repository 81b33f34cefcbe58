"""Image transforms: ImageNet normalisation, the photometric view, and the geometric views.

* :func:`normalize` — ``(3, H, W)`` or ``(B, 3, H, W)`` uint8 (0..255) or float (0..1) tensor
  -> float32 tensor normalised with the ImageNet mean/std the backbones were trained with.
* :func:`photometric_augment` — the consistency-loss view of spec §5: colour jitter
  (brightness 0.3, contrast 0.3, saturation 0.3, hue 0.1), random grayscale (p = 0.2),
  Gaussian blur 5×5 (p = 0.5), applied to the *un-normalised* image.
* :func:`resize_shorter_side`, :func:`center_crop`, :func:`val_view` — the validation view of
  spec §7: shorter side resized to ``size``, then a ``size × size`` centre crop. Label maps
  always use nearest-neighbour; the image too by default **[ref quirk]**, bilinear on request.

Geometry follows torchvision's conventions so that results match the reference code path:
the long side after a shorter-side resize is ``int(size * long / short)`` and a centre crop
starts at ``int(round((extent - size) / 2))``.
"""

from __future__ import annotations

import functools
from typing import Literal, TypeVar

import numpy as np
import torch
from PIL import Image

# The normalisation belongs to the backbones; data applies it for them.
from hpseg.backbones.registry import IMAGENET_MEAN, IMAGENET_STD
from hpseg.errors import InvalidInputError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageInterpolation",
    "center_crop",
    "normalize",
    "photometric_augment",
    "pil_to_uint8_tensor",
    "resize_shorter_side",
    "val_view",
]

ImageInterpolation = Literal["nearest", "bilinear"]
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}

T = TypeVar("T", torch.Tensor, Image.Image)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise an image tensor.

    img: (3, H, W) or (B, 3, H, W); uint8 in [0, 255] or floating point in [0, 1].
    Returns float32 of the same shape, ``(img - mean) / std`` per channel.
    """
    if img.ndim not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"normalize expects (3, H, W) or (B, 3, H, W), got {tuple(img.shape)}")
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def pil_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor (a copy; safe to modify)."""
    a = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


@functools.cache
def _photometric_transform():
    # Built on first use: importing torchvision.transforms.v2 costs ~0.3 s and is not always needed.
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=0.5),
        ]
    )


def photometric_augment(img: T) -> T:
    """Photometric view for the consistency loss (spec §5), on the un-normalised image.

    img: an RGB PIL image, or a (3, H, W) / (B, 3, H, W) tensor, uint8 in [0, 255] or float in
    [0, 1]; returns the same type, shape and dtype. For a batch every image gets its own random
    draw (torchvision would otherwise share one draw across the batch). Randomness comes from
    torch's global generator, so seed it (or the DataLoader worker) for reproducibility.
    """
    tf = _photometric_transform()
    if isinstance(img, Image.Image):
        return tf(img.convert("RGB") if img.mode != "RGB" else img)
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"photometric_augment expects a PIL image or a tensor, got {type(img).__name__}")
    if img.ndim == 4:
        return torch.stack([tf(x) for x in img])
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"photometric_augment expects (3, H, W) or (B, 3, H, W), got {tuple(img.shape)}")
    return tf(img)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(H', W') of an image whose shorter side is resized to ``size`` (0: unchanged).

    Same rounding as the validation view (torchvision's): the long side becomes
    ``int(size * long / short)``, at least 1.
    """
    if height < 1 or width < 1:
        raise InvalidInputError(f"empty image of size {width}x{height}")
    if size <= 0:
        return height, width
    if height <= width:
        return size, max(1, int(size * width / height))
    return max(1, int(size * height / width)), size


def resize_shorter_side(img: Image.Image, size: int, resample: int = Image.Resampling.NEAREST) -> Image.Image:
    """Resize so that the shorter side becomes ``size`` (aspect kept, torchvision rounding)."""
    w, h = img.size
    new_h, new_w = resized_shape(h, w, size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre ``size × size`` crop of an image at least ``size`` pixels on each side."""
    w, h = img.size
    if w < size or h < size:
        raise InvalidInputError(f"centre crop {size} larger than image {w}x{h}")
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def label_to_pil(label: np.ndarray) -> Image.Image:
    """(H, W) integer label map -> PIL mode ``I`` (int32 keeps −1 and any class id)."""
    return Image.fromarray(np.ascontiguousarray(label, dtype=np.int32))


def val_view(
    image: Image.Image,
    label: np.ndarray | None,
    size: int = 320,
    image_interpolation: ImageInterpolation = "nearest",
) -> tuple[Image.Image, np.ndarray | None]:
    """Validation view: shorter side -> ``size``, centre crop ``size × size``.

    image: RGB PIL (H, W); label: (H, W) int64 or None. Returns (RGB PIL (size, size),
    (size, size) int64 label or None). The label is always resized nearest-neighbour; the image
    with ``image_interpolation`` ("nearest" = reference behaviour **[ref quirk]**, or "bilinear").
    """
    if image_interpolation not in _RESAMPLE:
        raise ValueError(f"image_interpolation must be 'nearest' or 'bilinear', got {image_interpolation!r}")
    img = center_crop(resize_shorter_side(image, size, _RESAMPLE[image_interpolation]), size)
    if label is None:
        return img, None
    if label.shape != (image.height, image.width):
        raise ValueError(f"label shape {label.shape} differs from image size {(image.height, image.width)}")
    lab = center_crop(resize_shorter_side(label_to_pil(label), size, Image.Resampling.NEAREST), size)
    return img, np.asarray(lab).astype(np.int64)
