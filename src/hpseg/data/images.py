"""Robust reading of images and label maps.

* :func:`read_image` opens any file Pillow can decode, in any mode (``1``, ``L``, ``LA``,
  ``P``/``PA`` palettes, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``, 16-bit ``I;16*``, 32-bit
  ``I``, float ``F``), and returns an RGB ``uint8`` :class:`PIL.Image.Image`.
* :func:`array_to_rgb` does the same for an ``(H, W)`` or ``(H, W, C)`` array (e.g. from a
  ``.mat`` file).
* :func:`read_label` reads a single-channel class-id map as an ``(H, W)`` ``int64`` array of
  the raw stored values (no class mapping).

Every failure — missing file, truncated or corrupt data, unsupported mode — raises
:class:`~hpseg.data.ImageReadError` naming the path and the reason, never a bare Pillow
traceback in the middle of an epoch.

Conversions to 8 bit (documented because they change pixel values):

* alpha channels are dropped (not composited): datasets of photos rarely carry
  meaningful alpha, and dropping it keeps the colours of the stored pixels;
* 16-bit images (``I;16*`` and ``uint16`` arrays) are scaled by their full range,
  ``v8 = round(v16 / 257)`` — the same for every image of a dataset, so brightness stays
  comparable between images (a per-image stretch would not);
* 32-bit integer (``I``) and float (``F``) data have no standard range: values already in
  [0, 255] are kept, integers in [0, 65535] are treated as 16 bit, floats in [0, 1] are
  multiplied by 255, anything else is min–max stretched per image.

EXIF orientation is deliberately *not* applied: label maps (e.g. COCO-Stuff's) are
aligned with the stored pixel grid, not with the displayed orientation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hpseg.errors import InvalidInputError

from .errors import ImageReadError

__all__ = ["array_to_rgb", "read_image", "read_label", "to_rgb"]

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}

#: File name endings taken as images when a folder is walked (a dataset's ``images/``, a folder
#: given to ``hpseg predict``); a file named explicitly is tried whatever its ending.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm")


def _open_and_load(path: Path) -> Image.Image:
    img = None
    try:
        # (No warnings.catch_warnings around this: it is not thread-safe, and prepare_five_crops
        # reads from several threads. Pillow's DecompressionBombWarning simply passes through.)
        img = Image.open(path)
        # Image.open is lazy: decode now so that truncated data fails here, not later.
        img.load()
    except BaseException:
        if img is not None:
            img.close()  # do not leak the file handle of a half-decoded image
        raise
    return img


def _open_decoded(path: Path) -> Image.Image:
    """Open ``path`` and force decoding, turning every failure into ImageReadError."""
    try:
        return _open_and_load(path)
    except FileNotFoundError as e:
        raise ImageReadError(f"cannot read {path}: file not found", path) from e
    except Image.DecompressionBombError as e:
        raise ImageReadError(
            f"cannot read {path}: image too large for Pillow's safety limit ({e}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted",
            path,
        ) from e
    except Exception as e:
        raise ImageReadError(f"cannot read {path}: {type(e).__name__}: {e}", path) from e


def _scale_to_uint8(a: np.ndarray, sixteen_bit: bool = False) -> np.ndarray:
    """Map a numeric array to uint8 following the rules in the module docstring."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if sixteen_bit or a.dtype == np.uint16:
        return np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    is_int = np.issubdtype(a.dtype, np.integer)
    a = a.astype(np.float64)
    a = np.where(np.isfinite(a), a, 0.0)  # NaN/inf (e.g. nodata in float rasters) -> 0
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if not is_int and lo >= 0.0 and hi <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0:
        return np.rint(a).astype(np.uint8)
    if is_int and lo >= 0.0 and hi <= 65535.0:
        return np.rint(a / 257.0).astype(np.uint8)
    if hi > lo:
        return np.rint((a - lo) / (hi - lo) * 255.0).astype(np.uint8)
    return np.zeros(a.shape, np.uint8)


def array_to_rgb(a: np.ndarray) -> Image.Image:
    """(H, W) or (H, W, C) numeric array -> RGB uint8 PIL image.

    One channel is replicated to grey; two channels are read as grey + alpha; with three or
    more channels the first three are taken as RGB (e.g. Potsdam's R, G, B, IR).
    """
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        g = _scale_to_uint8(a)
        return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB")
    if a.ndim != 3 or a.shape[2] < 2:
        raise InvalidInputError(f"expected an (H, W) or (H, W, C) image array, got shape {a.shape}")
    if a.shape[2] == 2:
        g = _scale_to_uint8(a[:, :, 0])
        return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB")
    # Scale the three colour channels jointly so their relative balance is preserved.
    rgb = _scale_to_uint8(np.ascontiguousarray(a[:, :, :3]))
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to RGB uint8."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own convert() clips 16-bit values at 255 (almost all white): scale instead.
        return array_to_rgb(_scale_to_uint8(np.asarray(img), sixteen_bit=True))
    if mode in ("I", "F"):
        return array_to_rgb(np.asarray(img))
    if mode in ("P", "PA"):
        # Palette images may carry transparency; go through RGBA so convert() keeps colours.
        return img.convert("RGBA").convert("RGB")
    if mode in ("L", "LA", "La", "1", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "HSV"):
        return img.convert("RGB")
    if mode == "LAB":
        return Image.merge("RGB", [img.getchannel(0)] * 3)
    return img.convert("RGB")  # anything newer Pillow may add: let it try


def read_image(path: str | Path) -> Image.Image:
    """Read an image file as an RGB uint8 PIL image; raises ImageReadError on any failure."""
    path = Path(path)
    with _open_decoded(path) as img:
        try:
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # multi-page TIFF / animated GIF: the first frame
            out = to_rgb(img)
            if out is img:
                out = img.copy()  # detach from the file, which the with-block closes
        except Exception as e:
            raise ImageReadError(f"cannot convert {path} (mode {img.mode}) to RGB: {e}", path) from e
    return out


def read_label(path: str | Path) -> np.ndarray:
    """Read a class-id map -> (H, W) int64 array of the stored values.

    Accepts single-channel modes (``L``, ``P`` palette indices, ``I``, ``I;16``) and RGB/RGBA
    files whose colour channels are all equal (grey saved as RGB). Colour-coded RGB labels
    are refused: the mapping from colours to ids is dataset-specific.
    """
    path = Path(path)
    with _open_decoded(path) as img:
        if img.mode in ("L", "P", "I", "1") or img.mode in _SIXTEEN_BIT_MODES:
            return np.array(img).astype(np.int64)
        if img.mode in ("LA", "PA"):
            return np.array(img)[:, :, 0].astype(np.int64)
        if img.mode in ("RGB", "RGBA"):
            a = np.array(img)
            if np.array_equal(a[:, :, 0], a[:, :, 1]) and np.array_equal(a[:, :, 0], a[:, :, 2]):
                return a[:, :, 0].astype(np.int64)
            raise ImageReadError(
                f"label {path} is a colour image (mode {img.mode}); labels must be single-channel "
                "PNGs whose values are class ids (255 = ignore)",
                path,
            )
        raise ImageReadError(f"label {path} has unsupported mode {img.mode}", path)
