"""Procedural synthetic segmentation data with exact pixel labels (tests, demos, smoke runs).

:func:`make_synthetic_dataset` writes a ``folder``-layout dataset::

    out_dir/
        classes.txt
        train/images/00000.png ...   train/labels/00000.png ...
        val/images/00000.png ...     val/labels/00000.png ...

Each scene is a partition of the image into a few regions of varied size and shape
(a multiplicatively weighted Voronoi diagram of 3–7 random sites, computed on warped
coordinates so that borders are curved), each region painted with one class. A class is
defined by a mean colour *and* a texture:

* colours: hues evenly spaced around the colour wheel, alternating brightness; every region
  jitters its colour and every image its brightness, so the colour distributions of classes
  overlap a little (texture then helps) while staying mostly separable (a frozen backbone can
  still tell them apart by colour);
* textures cycle through stripes (class-specific orientation and period), checkerboard,
  fine grain noise, a smooth gradient and dots; classes beyond the fifth reuse a texture
  kind with other parameters.

The class definitions depend only on ``n_classes``; ``seed`` draws the scenes. The output is
deterministic: the same arguments give the same bytes. With ``n_train, n_val >= n_classes``
every class appears in both splits (image i always contains class ``i % n_classes``).
"""

from __future__ import annotations

import colorsys
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from hpseg.errors import InvalidInputError

__all__ = ["TEXTURES", "make_synthetic_dataset"]

TEXTURES = ("stripes", "checker", "grain", "gradient", "dots")
_TEXTURE_AMPLITUDE = 0.14  # in colour units (0..1): visible, but smaller than colour gaps
_REGION_COLOUR_JITTER = 0.06  # std of the per-region colour offset
_PIXEL_NOISE = 0.015  # sensor-like noise on every pixel
_OUR_FILE = re.compile(r"^\d{5}\.png$")


@dataclass(frozen=True)
class _ClassStyle:
    colour: np.ndarray  # (3,) float in [0, 1]
    texture: str
    angle: float  # radians, stripes / checker orientation
    period: float  # pixels at 64 px image size


def _class_styles(n_classes: int) -> list[_ClassStyle]:
    styles = []
    for k in range(n_classes):
        hue = k / n_classes
        value = 0.78 if k % 2 == 0 else 0.55
        sat = 0.62 if (k // 2) % 2 == 0 else 0.45
        colour = np.array(colorsys.hsv_to_rgb(hue, sat, value))
        kind = TEXTURES[k % len(TEXTURES)]
        variant = k // len(TEXTURES)
        angle = np.deg2rad((35 + 55 * k) % 180)
        period = 4.0 + 2.0 * (variant % 3) + (k % 2)
        styles.append(_ClassStyle(colour=colour, texture=kind, angle=float(angle), period=period))
    return styles


#: Hue names, one per twelfth of the colour wheel starting at red.
_HUES = ("red", "orange", "yellow", "lime", "green", "spring green", "cyan", "azure", "blue", "violet",
         "magenta", "rose")


def class_names(styles: list[_ClassStyle]) -> list[str]:
    """``class K (<hue> <texture>)``: textures repeat from the sixth class on, so the hue is what
    tells two classes of one texture apart in a legend."""
    names = []
    for k, style in enumerate(styles):
        hue = colorsys.rgb_to_hsv(*style.colour)[0]
        names.append(f"class {k} ({_HUES[round(hue * len(_HUES)) % len(_HUES)]} {style.texture})")
    return names


def _texture(
    style: _ClassStyle, yy: np.ndarray, xx: np.ndarray, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Texture pattern of one region, (H, W) values roughly in [-1, 1]."""
    p = style.period * scale
    phase = rng.uniform(0, 2 * np.pi)
    if style.texture == "stripes":
        u = xx * np.cos(style.angle) + yy * np.sin(style.angle)
        return np.sin(2 * np.pi * u / p + phase)
    if style.texture == "checker":
        u = xx * np.cos(style.angle) + yy * np.sin(style.angle)
        v = -xx * np.sin(style.angle) + yy * np.cos(style.angle)
        return np.sign(np.sin(np.pi * u / p + phase) * np.sin(np.pi * v / p + phase)) * 0.8
    if style.texture == "grain":
        return np.clip(rng.normal(0.0, 0.6, size=xx.shape), -1.5, 1.5)
    if style.texture == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        extent = max(xx.max(), yy.max()) + 1
        u = (xx * np.cos(a) + yy * np.sin(a)) / extent  # ~[-1, 1] across the image
        return 1.2 * u
    # dots: bright round spots on a slightly dark ground
    c = np.cos(2 * np.pi * xx / (1.5 * p) + phase) * np.cos(2 * np.pi * yy / (1.5 * p) + phase)
    return np.where(c > 0.55, 1.0, -0.35)


def _scene_labels(size: int, n_classes: int, first_class: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) uint8 class map of one scene; contains ``first_class`` in a large region."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for _ in range(20):
        n_sites = int(rng.integers(3, 8))
        sites = rng.uniform(0, size, size=(n_sites, 2))
        weights = rng.uniform(0.6, 1.5, size=n_sites)
        weights[0] = 0.6  # the guaranteed class gets the most "pull": a big region
        # Smooth coordinate warp -> wavy borders instead of straight Voronoi edges.
        amp = size / 10.0
        f1, f2 = rng.uniform(0.5, 2.0, size=2) * 2 * np.pi / size
        p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
        wy = yy + amp * np.sin(f1 * xx + p1)
        wx = xx + amp * np.sin(f2 * yy + p2)
        d = (
            np.hypot(wy[None] - sites[:, 0, None, None], wx[None] - sites[:, 1, None, None])
            * weights[:, None, None]
        )
        cell = np.argmin(d, axis=0)
        classes = rng.integers(0, n_classes, size=n_sites)
        classes[0] = first_class
        label = classes[cell].astype(np.uint8)
        if (label == first_class).mean() >= 0.05:
            return label
    label[: size // 4, : size // 4] = first_class  # practically unreachable fallback
    return label


def _render(label: np.ndarray, styles: list[_ClassStyle], rng: np.random.Generator) -> np.ndarray:
    """(H, W) class map -> (H, W, 3) uint8 image."""
    size = label.shape[0]
    scale = size / 64.0
    yy, xx = np.mgrid[0 : label.shape[0], 0 : label.shape[1]].astype(np.float64)
    img = np.zeros(label.shape + (3,), dtype=np.float64)
    for k in np.unique(label):
        m = label == k
        st = styles[int(k)]
        colour = st.colour + rng.normal(0.0, _REGION_COLOUR_JITTER, size=3)
        pattern = _texture(st, yy, xx, scale, rng)
        img[m] = colour[None, :] + _TEXTURE_AMPLITUDE * pattern[m][:, None]
    img *= rng.uniform(0.9, 1.1)  # global illumination of the scene
    img += rng.normal(0.0, _PIXEL_NOISE, size=img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _write_split(out: Path, n: int, size: int, styles: list[_ClassStyle], rng: np.random.Generator) -> None:
    img_dir, lbl_dir = out / "images", out / "labels"
    for d in (img_dir, lbl_dir):
        d.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(d):  # drop our files of an earlier, larger run (only ours)
            if _OUR_FILE.match(name) and int(name[:5]) >= n:
                (d / name).unlink()
    k = len(styles)
    for i in range(n):
        label = _scene_labels(size, k, i % k, rng)
        image = _render(label, styles, rng)
        # compress_level fixed so the bytes do not depend on Pillow's default.
        Image.fromarray(image, "RGB").save(img_dir / f"{i:05d}.png", compress_level=6)
        Image.fromarray(label, "L").save(lbl_dir / f"{i:05d}.png", compress_level=6)


def make_synthetic_dataset(
    out_dir: str | Path,
    *,
    n_train: int = 64,
    n_val: int = 16,
    size: int = 64,
    n_classes: int = 4,
    seed: int = 0,
) -> Path:
    """Write a synthetic folder-layout dataset to ``out_dir`` and return ``out_dir``.

    Images are ``size × size`` RGB PNGs, labels ``size × size`` uint8 PNGs with exact class
    ids in ``[0, n_classes)``; ``classes.txt`` names the classes after their colour and texture.
    Read it back with ``build_raw_dataset("folder", out_dir, "train")``.
    """
    if not 1 <= n_classes <= 254:
        raise InvalidInputError(f"n_classes must be in [1, 254], got {n_classes}")
    if size < 8:
        raise InvalidInputError(f"size must be at least 8, got {size}")
    if n_train < 0 or n_val < 0:
        raise InvalidInputError("n_train and n_val must be non-negative")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    styles = _class_styles(n_classes)
    (out / "classes.txt").write_text("\n".join(class_names(styles)) + "\n")
    # Independent streams per split: changing n_train does not change the validation images.
    train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
    _write_split(out / "train", n_train, size, styles, np.random.default_rng(train_seq))
    _write_split(out / "val", n_val, size, styles, np.random.default_rng(val_seq))
    return out
