"""Patch-aligned geometry: resize, pad, tile into windows, average, upsample.

One implementation, used by the Python API (:mod:`hpseg.inference.segmenter`), ``hpseg predict``
and the data transforms (:func:`resized_shape`).

Geometry (shared with the Python API, :mod:`hpseg.inference.segmenter`; one implementation):

1. **Resize.** The image is resized (bilinear, antialiased) so that its *shorter side* equals
   ``size`` -- by default the checkpoint's validation size ``data.val_size`` (320 for the paper's
   presets), the scale the head was validated at. ``size=0`` keeps the image as it is.
2. **Pad.** The resized image is padded on the bottom and right (edge pixels repeated) to a
   multiple of the backbone's patch size.
3. **Tile.** Square windows of ``window`` pixels (default: ``size``, i.e. the validation crop;
   ``window=0``: the whole image in one pass) slide over the padded image with a stride of
   about two thirds of a window, always a multiple of the patch size, so every window's patch
   grid falls on the same global grid; the last window is flush with the bottom/right edge.
   A side shorter than a window is covered by a shorter window.
4. **Average.** Per window the backbone and the head give per-patch scores (cluster head:
   ``<s, c_k / ||c_k||>`` as in evaluation; linear head: the probe's logits); scores of patches
   covered by several windows are averaged.
5. **Upsample.** The patch scores are interpolated bilinearly straight to the *input's*
   resolution (the input pixel centre is mapped through the resize into the patch grid; the
   same sampling as ``F.interpolate(..., mode="bilinear", align_corners=False)``), in bands of
   rows so a large photo never needs a full (K, H, W) score tensor, and the argmax is taken.
   With ``--crf`` the scores are first refined by the dense CRF at the resized resolution (as
   evaluation does at its crop size), then sampled to the input's resolution.

So a label map always has exactly the input image's height and width, whatever its size and
aspect ratio. A ``size``-square image with ``size=window`` gives exactly the label map the
evaluation computes for that crop.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from hpseg.data.transforms import resized_shape
from hpseg.errors import InvalidInputError

__all__ = ["Tiling", "resample", "resample_argmax", "resized_shape", "tile_and_average", "tile_and_average_many",
           "window_starts"]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` covering ``[0, length)``; the last is flush with the end."""
    if window >= length:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


@dataclass(frozen=True)
class Tiling:
    """How images are resized and cut into windows (see the module docstring).

    Attributes:
        size: shorter side after resizing, 0 = keep the image's size.
        window: side of the square windows in pixels (a multiple of ``patch``), 0 = one window
            over the whole (padded) image.
        patch: the backbone's patch size.
    """

    size: int
    window: int
    patch: int

    def __post_init__(self) -> None:
        if self.size < 0 or self.window < 0 or self.patch < 1:
            raise InvalidInputError(f"invalid tiling: size={self.size}, window={self.window}, patch={self.patch}")
        if self.window % self.patch:
            raise InvalidInputError(f"window {self.window} must be a multiple of the patch size {self.patch}")

    @classmethod
    def create(cls, size: int, window: int | None, patch: int) -> Tiling:
        """``window=None``: the resize size rounded up to the patch size (or whole images when
        ``size`` is 0)."""
        if window is None:
            window = size
        window = int(math.ceil(window / patch) * patch) if window > 0 else 0
        return cls(size=int(size), window=window, patch=int(patch))

    def stride(self, window: int) -> int:
        """Window step: about two thirds of a window, a multiple of the patch size."""
        return max(self.patch, (2 * window // 3) // self.patch * self.patch)

    def padded(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch
        return int(math.ceil(height / p) * p), int(math.ceil(width / p) * p)

    def windows(self, height: int, width: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """For a padded (H, W): the window shape (wh, ww) and the (top, left) offsets."""
        wh = height if self.window == 0 else min(self.window, height)
        ww = width if self.window == 0 else min(self.window, width)
        tops = window_starts(height, wh, self.stride(wh))
        lefts = window_starts(width, ww, self.stride(ww))
        return (wh, ww), [(top, left) for top in tops for left in lefts]


def _source_index(n_out: int, n_in: int, scale: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear source indices and weights, PyTorch's align_corners=False convention."""
    src = (torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale - 0.5
    src = src.clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam = (src - i0.double()).clamp(0.0, 1.0).float()
    return i0, i1, lam


def _resample_rows(scores: torch.Tensor, rows: slice, y: tuple, x: tuple) -> torch.Tensor:
    y0, y1, ly = (t[rows] for t in y)
    x0, x1, lx = x
    top, bottom = scores[:, y0], scores[:, y1]  # (K, r, w_in)
    band = top + (bottom - top) * ly[None, :, None]
    left, right = band[:, :, x0], band[:, :, x1]
    return left + (right - left) * lx[None, None, :]


def resample(scores: torch.Tensor, size: tuple[int, int], scale: tuple[float, float] | None = None) -> torch.Tensor:
    """Bilinear resampling of (K, h, w) scores to (K, H, W).

    The output pixel centre ``y + 0.5`` maps to the input coordinate ``(y + 0.5) * scale - 0.5``;
    ``scale=None`` means ``(h / H, w / W)``, which is exactly
    ``F.interpolate(scores[None], size, mode="bilinear", align_corners=False)[0]``.
    """
    k, h, w = scores.shape
    height, width = size
    sy, sx = scale if scale is not None else (h / height, w / width)
    y = _source_index(height, h, sy, scores.device)
    x = _source_index(width, w, sx, scores.device)
    return _resample_rows(scores.float(), slice(None), y, x)


def resample_argmax(
    scores: torch.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float] | None = None,
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """``resample(scores, size, scale).argmax(0)`` computed in bands of rows: (H, W) int64."""
    k, h, w = scores.shape
    height, width = size
    sy, sx = scale if scale is not None else (h / height, w / width)
    y = _source_index(height, h, sy, scores.device)
    x = _source_index(width, w, sx, scores.device)
    rows = max(1, max_elements // max(1, k * width))
    scores = scores.float()
    out = torch.empty((height, width), dtype=torch.int64, device=scores.device)
    for start in range(0, height, rows):
        band = slice(start, min(height, start + rows))
        out[band] = _resample_rows(scores, band, y, x).argmax(0)
    return out


class _Grid:
    """One image's running sums on the patch grid while its windows go through ``compute``."""

    def __init__(self, image: torch.Tensor, tiling: Tiling) -> None:
        p = tiling.patch
        height, width = image.shape[-2:]
        if height % p or width % p:
            raise ValueError(f"padded image {height}x{width} is not a multiple of the patch size {p}")
        self.image, self.patch = image, p
        self.window, self.offsets = tiling.windows(height, width)
        self.grid_shape = (height // p, width // p)
        self.total: torch.Tensor | None = None  # (X, h, w), allocated when the first values come
        self.count = torch.zeros((1, *self.grid_shape), device=image.device)
        self.remaining = len(self.offsets)

    def crop(self, offset: tuple[int, int]) -> torch.Tensor:
        (wh, ww), (top, left) = self.window, offset
        return self.image[:, top : top + wh, left : left + ww]

    def add(self, offset: tuple[int, int], value: torch.Tensor) -> None:
        """Add one window's (X, wh/p, ww/p) values at ``offset``."""
        if self.total is None:
            self.total = torch.zeros((value.shape[0], *self.grid_shape), device=self.image.device)
        (wh, ww), (top, left), p = self.window, offset, self.patch
        rows, cols = slice(top // p, (top + wh) // p), slice(left // p, (left + ww) // p)
        self.total[:, rows, cols] += value
        self.count[:, rows, cols] += 1
        self.remaining -= 1

    def mean(self) -> torch.Tensor:
        assert self.total is not None and self.remaining == 0
        return self.total / self.count


@torch.no_grad()
def tile_and_average_many(
    images: Iterable[torch.Tensor],
    tiling: Tiling,
    compute: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 8,
) -> Iterator[torch.Tensor]:
    """:func:`tile_and_average` over a stream of padded (3, H, W) images, the windows of
    consecutive images sharing ``compute`` calls: yields each image's (X, H/p, W/p) grid, in order.

    Windows are taken in image order and cut into calls of ``batch_size`` windows; a call ends
    early where the window shape changes (an image smaller than a window, ``window=0``), since
    one call takes windows of one shape. ``images`` is read lazily and a grid is yielded as soon
    as its last window is computed: only the images with windows in the current call are held,
    however long the stream (memory: ``batch_size`` windows at a time). Each image's sums run in the
    same order as :func:`tile_and_average`'s, so its grid differs only by ``compute``'s own
    rounding for other batch compositions.
    """
    batch_size = max(1, batch_size)
    started: deque[_Grid] = deque()  # images with windows not yet yielded, in input order
    batch: list[tuple[_Grid, tuple[int, int]]] = []

    def run_batch() -> Iterator[torch.Tensor]:
        values = compute(torch.stack([grid.crop(offset) for grid, offset in batch])).float()
        for (grid, offset), value in zip(batch, values):
            grid.add(offset, value)
        batch.clear()
        while started and started[0].remaining == 0:
            yield started.popleft().mean()

    for image in images:
        grid = _Grid(image, tiling)
        started.append(grid)
        for offset in grid.offsets:
            if batch and batch[0][0].window != grid.window:
                yield from run_batch()
            batch.append((grid, offset))
            if len(batch) == batch_size:
                yield from run_batch()
    if batch:
        yield from run_batch()


@torch.no_grad()
def tile_and_average(
    image: torch.Tensor,
    tiling: Tiling,
    compute: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 8,
) -> torch.Tensor:
    """Run ``compute`` over the windows of a padded (3, H, W) image and average on the patch grid.

    ``compute`` maps (B, 3, wh, ww) windows to (B, X, wh/p, ww/p) per-patch values, B at most
    ``batch_size``; the result is (X, H/p, W/p), each patch the mean over the windows that cover it.
    """
    return next(tile_and_average_many([image], tiling, compute, batch_size))
