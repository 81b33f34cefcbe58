"""Mosaics of real photographs' textures with exact pixel labels (tests and benchmarks).

:func:`make_texture_mosaic_dataset` writes a ``folder``-layout dataset like
:func:`hpseg.data.make_synthetic_dataset` -- the same random region layouts (warped weighted
Voronoi cells) -- but each region shows a random window of a real photograph shipped with
scikit-image (``skimage.data``: brick, grass, gravel, coffee, the Hubble deep field, the moon, a
retina, ...): class k = source image k. The textures are real, the labels exact.

Needs scikit-image (``pip install -e ".[test]"``); the images ship inside the package, nothing
is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hpseg.data.synthetic import _scene_labels
from hpseg.errors import InvalidInputError
from hpseg.files import write_text_atomic
from hpseg.visualize import save_image_atomic

__all__ = ["TEXTURE_SOURCES", "make_texture_mosaic_dataset"]

#: skimage.data images used as classes, in class order (all bundled with scikit-image).
TEXTURE_SOURCES = ("brick", "grass", "gravel", "coffee", "hubble_deep_field", "moon", "retina",
                   "immunohistochemistry", "rocket", "coins", "astronaut", "chelsea", "camera", "cell")


def _sources(n_classes: int, size: int) -> list[np.ndarray]:
    """(H, W, 3) uint8 source of each class, resized so its shorter side is 2.5 x ``size``."""
    try:
        # Lazy: scikit-image is a test/benchmark extra only, and only this function needs it.
        import skimage.data
    except ImportError:
        raise ImportError("texture mosaics need scikit-image: pip install scikit-image "
                          "(or pip install -e \".[test]\")") from None
    out = []
    for name in TEXTURE_SOURCES[:n_classes]:
        image = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
        scale = 2.5 * size / min(image.size)
        out.append(np.asarray(image.resize((round(image.width * scale), round(image.height * scale)),
                                           Image.Resampling.BILINEAR)))
    return out


def _render(label: np.ndarray, sources: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """(S, S) class map -> (S, S, 3) uint8: each region a random window of its class's source."""
    size = label.shape[0]
    image = np.zeros(label.shape + (3,), dtype=np.uint8)
    for k in np.unique(label):
        source = sources[int(k)]
        top = int(rng.integers(0, source.shape[0] - size + 1))
        left = int(rng.integers(0, source.shape[1] - size + 1))
        window = source[top : top + size, left : left + size]
        image[label == k] = window[label == k]
    return image


def make_texture_mosaic_dataset(out_dir: str | Path, *, n_train: int = 32, n_val: int = 16, size: int = 64,
                                n_classes: int = 5, seed: int = 0) -> Path:
    """Write ``out_dir/{train,val}/{images,labels}/NNNNN.png`` and ``classes.txt``; returns ``out_dir``.

    Image i contains class ``i % n_classes`` in a large region (every class in both splits when
    ``n_train, n_val >= n_classes``). Deterministic for given arguments.
    """
    if not 2 <= n_classes <= len(TEXTURE_SOURCES):
        raise InvalidInputError(f"n_classes must be in [2, {len(TEXTURE_SOURCES)}] (one skimage.data image each), "
                         f"got {n_classes}")
    if size < 8:
        raise InvalidInputError(f"size must be at least 8, got {size}")
    out = Path(out_dir)
    sources = _sources(n_classes, size)
    write_text_atomic("\n".join(TEXTURE_SOURCES[:n_classes]) + "\n", out / "classes.txt")
    for split, n, stream in zip(("train", "val"), (n_train, n_val), np.random.SeedSequence(seed).spawn(2)):
        rng = np.random.default_rng(stream)
        for i in range(n):
            label = _scene_labels(size, n_classes, i % n_classes, rng)
            save_image_atomic(Image.fromarray(_render(label, sources, rng), "RGB"), out / split / "images" / f"{i:05d}.png")
            save_image_atomic(Image.fromarray(label, "L"), out / split / "labels" / f"{i:05d}.png")
    return out
