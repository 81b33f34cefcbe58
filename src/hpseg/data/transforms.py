"""Image transforms: ImageNet normalisation, the photometric view, and the geometric views.

* :func:`normalize` — ``(3, H, W)`` or ``(B, 3, H, W)`` uint8 (0..255) or float (0..1) tensor
  -> float32 tensor normalised with the ImageNet mean/std the backbones were trained with.
* :func:`photometric_view` — the consistency-loss view of spec §5 with given parameters
  (:class:`PhotometricParams`: the jitter factors and their order, greyscale, blur σ);
  :func:`draw_photometric_params` draws them as torchvision's ColorJitter(0.3, 0.3, 0.3, 0.1),
  RandomGrayscale(0.2) and RandomApply([GaussianBlur(5, σ ∈ [0.1, 2])], p = 0.5) do, and
  :func:`photometric_augment` draws and applies them. **[ref quirk]** The authors apply the view
  to the *already normalised* tensor (torchvision's float brightness / contrast / saturation clip
  it to [0, 1]) and do not normalise it again (``PhotometricInput`` "normalized", the default);
  "uint8" applies it to the 0..255 image and normalises afterwards (the cleaner order).
* :func:`resize_shorter_side`, :func:`center_crop`, :func:`val_view` — the validation view of
  spec §7: shorter side resized to ``size``, then a ``size × size`` centre crop. Label maps
  always use nearest-neighbour; the image too by default **[ref quirk]**, bilinear on request.

Geometry follows torchvision's conventions so that results match the reference code path:
the long side after a shorter-side resize is ``int(size * long / short)`` and a centre crop
starts at ``int(round((extent - size) / 2))``.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    "PhotometricInput",
    "PhotometricParams",
    "center_crop",
    "draw_photometric_params",
    "label_view",
    "normalize",
    "photometric_augment",
    "photometric_pair",
    "photometric_view",
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


#: Where the photometric view is applied: "normalized" = to the ImageNet-normalised tensor, not
#: normalised again **[ref quirk]**; "uint8" = to the 0..255 image, normalised afterwards.
PhotometricInput = Literal["normalized", "uint8"]
#: The colour-jitter operations, by the index torchvision's ColorJitter gives them.
JITTER_OPERATIONS = ("brightness", "contrast", "saturation", "hue")
BLUR_KERNEL = 5
_JITTER, _HUE, _GREYSCALE_P, _BLUR_P, _BLUR_SIGMA = 0.3, 0.1, 0.2, 0.5, (0.1, 2.0)


@dataclass(frozen=True)
class PhotometricParams:
    """One draw of the photometric view.

    order: the four jitter operations (indices into ``JITTER_OPERATIONS``) in the order they run;
    brightness, contrast, saturation, hue: their factors, None = operation skipped;
    grayscale: convert to 3 equal channels (0.2989 R + 0.587 G + 0.114 B) after the jitter;
    blur_sigma: σ of the 5×5 Gaussian blur (reflect padding) applied last, None = no blur.
    """

    order: tuple[int, ...] = (0, 1, 2, 3)
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None
    grayscale: bool = False
    blur_sigma: float | None = None

    def __post_init__(self) -> None:
        if sorted(self.order) != [0, 1, 2, 3]:
            raise ValueError(f"order must be a permutation of 0..3, got {self.order}")


def photometric_view(img: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
    """The photometric view of one image with the given parameters (deterministic).

    img: (3, H, W), uint8 in [0, 255] or float (any range: the authors pass the normalised
    tensor). Returns the same shape and dtype. torchvision's semantics: for floats, brightness,
    contrast and saturation blend and clip to [0, 1], hue goes through HSV without clipping.
    """
    from torchvision.transforms.v2 import functional as F  # ~0.3 s to import: only when used

    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"photometric_view expects (3, H, W), got {tuple(img.shape)}")
    adjust = {0: F.adjust_brightness, 1: F.adjust_contrast, 2: F.adjust_saturation, 3: F.adjust_hue}
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for op in params.order:
        if factors[op] is not None:
            img = adjust[op](img, factors[op])
    if params.grayscale:
        img = F.rgb_to_grayscale(img, num_output_channels=3)
    if params.blur_sigma is not None:
        img = F.gaussian_blur(img, [BLUR_KERNEL, BLUR_KERNEL], [params.blur_sigma, params.blur_sigma])
    return img


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def draw_photometric_params(generator: torch.Generator | None = None) -> PhotometricParams:
    """Parameters drawn as the authors' ColorJitter(0.3, 0.3, 0.3, 0.1), RandomGrayscale(0.2) and
    RandomApply([GaussianBlur(5, (0.1, 2.0))]) draw them (torch's global RNG by default)."""
    order = tuple(int(i) for i in torch.randperm(4, generator=generator))
    brightness, contrast, saturation = (_uniform(1 - _JITTER, 1 + _JITTER, generator) for _ in range(3))
    hue = _uniform(-_HUE, _HUE, generator)
    grayscale = bool(torch.rand(1, generator=generator) < _GREYSCALE_P)
    blur = bool(torch.rand(1, generator=generator) <= _BLUR_P)  # RandomApply skips when p < u
    sigma = _uniform(*_BLUR_SIGMA, generator) if blur else None
    return PhotometricParams(order, brightness, contrast, saturation, hue, grayscale, sigma)


def photometric_augment(img: T, generator: torch.Generator | None = None) -> T:
    """A random photometric view (spec §5): :func:`draw_photometric_params` then :func:`photometric_view`.

    img: an RGB PIL image, or a (3, H, W) / (B, 3, H, W) tensor (uint8, or float in any range);
    returns the same type, shape and dtype. For a batch every image gets its own draw.
    Randomness comes from ``generator`` or torch's global generator (seeded per DataLoader
    worker by torch), so seed it for reproducibility.
    """
    if isinstance(img, Image.Image):
        rgb = pil_to_uint8_tensor(img)
        out = photometric_view(rgb, draw_photometric_params(generator))
        return Image.fromarray(out.permute(1, 2, 0).numpy(), "RGB")
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"photometric_augment expects a PIL image or a tensor, got {type(img).__name__}")
    if img.ndim == 4:
        return torch.stack([photometric_augment(x, generator) for x in img])
    return photometric_view(img, draw_photometric_params(generator))


def photometric_pair(rgb: torch.Tensor, where: PhotometricInput,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised image, its photometric view) of a (3, H, W) uint8 image, the view applied
    where ``where`` says (module docstring)."""
    image = normalize(rgb)
    if where == "normalized":
        return image, photometric_augment(image, generator)
    if where == "uint8":
        return image, normalize(photometric_augment(rgb, generator))
    raise ValueError(f"photometric input must be 'normalized' or 'uint8', got {where!r}")


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
    return img, label_view(label, size)


def label_view(label: np.ndarray, size: int) -> np.ndarray:
    """(H, W) integer label map -> (size, size) int64: shorter side -> ``size`` (nearest), centre crop."""
    lab = center_crop(resize_shorter_side(label_to_pil(label), size, Image.Resampling.NEAREST), size)
    return np.asarray(lab).astype(np.int64)
