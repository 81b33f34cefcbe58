"""Global hidden positives (GHP, spec §3): who is a positive of whom, and the contrast set.

Anchors are the N patches of a minibatch, flattened image after image, row-major inside each
image. Everything here works on the anchors of a chunk or of one image against all N patches,
so no N x N matrix is ever built by the loss; :func:`hidden_positive_masks` assembles the full
matrices for inspection and tests only. TA and TS are symmetric: :func:`image_masks` computes
the similarities of each pair of images once and keeps the block a later image needs bit-packed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


def pool_thresholds(features: torch.Tensor, pool: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
    """r_i = max_p <features_i, pool_p>: each patch's best match in the threshold pool.

    Args:
        features: (N, C) L2-normalised patch features.
        pool: (P, C) L2-normalised threshold pool.
    Returns:
        (N,) thresholds, in the dtype of the product.
    """
    return torch.cat([(part @ pool.T).amax(1) for part in features.split(chunk_size)])


class ContrastDraw(Protocol):
    """The random part of the contrast set: which patches each anchor contrasts with.

    ``rows(start, stop, patches_per_image, n_patches)`` returns a (stop - start, N) bool mask
    and must return the same mask every time it is called with the same arguments (so that
    masks can be rebuilt for inspection; the loss asks for each chunk of anchors once).
    """

    def rows(self, start: int, stop: int, patches_per_image: int, n_patches: int) -> torch.Tensor: ...


@dataclass
class SharedContrastPattern:
    """[ref quirk] One (hw, N) random pattern per step; anchor i of every image uses row i mod hw.

    ``pattern[i, j]`` is True when patch j is in the random subsample of anchor i. Build it
    from an explicit uniform draw with ``from_uniform`` (tests, reproducibility) or with
    ``draw`` from a generator.
    """

    pattern: torch.Tensor  # (hw, N) bool

    @classmethod
    def from_uniform(cls, uniform: torch.Tensor, rho: float) -> SharedContrastPattern:
        """``uniform`` (hw, N) in [0, 1): patch j joins anchor i's subsample iff uniform[i, j] < rho."""
        return cls(uniform < rho)

    @classmethod
    def draw(
        cls,
        patches_per_image: int,
        n_patches: int,
        rho: float,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> SharedContrastPattern:
        uniform = torch.rand(patches_per_image, n_patches, generator=generator, device=device)
        return cls.from_uniform(uniform, rho)

    def rows(self, start: int, stop: int, patches_per_image: int, n_patches: int) -> torch.Tensor:
        if self.pattern.shape != (patches_per_image, n_patches):
            raise ValueError(
                f"contrast pattern of shape {tuple(self.pattern.shape)} does not match "
                f"{patches_per_image} patches per image and {n_patches} patches"
            )
        first = start % patches_per_image
        if first + (stop - start) <= patches_per_image:  # anchors of one image: a view, no copy
            return self.pattern[first : first + (stop - start)]
        anchors = torch.arange(start, stop, device=self.pattern.device) % patches_per_image
        return self.pattern[anchors]


@dataclass
class IndependentContrastDraw:
    """A fresh random subsample for every anchor (the clean alternative to the shared pattern).

    The draw of a chunk is regenerated from ``seed`` and the chunk's first anchor, so the loss
    can replay it in its backward pass without storing an N x N mask.
    """

    rho: float
    seed: int
    device: torch.device | str = "cpu"

    def rows(self, start: int, stop: int, patches_per_image: int, n_patches: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + start)
        return torch.rand(stop - start, n_patches, generator=generator, device=self.device) < self.rho


@dataclass
class PositiveMasks:
    """Masks of a chunk of anchors [start, stop) against all N patches, each (stop - start, N) bool.

    ``task_specific`` is None when it was not asked for (the loss skips it while lambda = 0).
    """

    task_agnostic: torch.Tensor  # TA(i)
    task_specific: torch.Tensor | None  # TS(i)
    contrast: torch.Tensor  # C(i) = TA(i) or random subsample, self excluded


@dataclass
class PositiveInputs:
    """Everything the positive masks depend on; none of it carries gradient.

    Shapes: task_agnostic (N, C) and task_specific (N, D) L2-normalised features,
    thresholds (N,) each; ``specific_thresholds`` is None when built without TS (then only
    masks without TS can be asked for).
    """

    task_agnostic: torch.Tensor
    task_specific: torch.Tensor
    agnostic_thresholds: torch.Tensor
    specific_thresholds: torch.Tensor | None
    patches_per_image: int
    contrast_draw: ContrastDraw

    @classmethod
    def build(
        cls,
        task_agnostic: torch.Tensor,
        task_specific: torch.Tensor,
        pool_agnostic: torch.Tensor,
        pool_specific: torch.Tensor,
        patches_per_image: int,
        contrast_draw: ContrastDraw,
        matmul_dtype: torch.dtype = torch.float32,
        *,
        task_specific_positives: bool = True,
    ) -> PositiveInputs:
        """Normalise features and pools and compute the pool thresholds r and r' (r' only with
        ``task_specific_positives``: the loss skips TS, and its N x P product, while lambda = 0)."""
        fn = F.normalize(task_agnostic.detach().float(), dim=1).to(matmul_dtype)
        sn = F.normalize(task_specific.detach().float(), dim=1).to(matmul_dtype)
        pool_ag = F.normalize(pool_agnostic.float(), dim=1).to(matmul_dtype)
        pool_sp = F.normalize(pool_specific.float(), dim=1).to(matmul_dtype)
        if fn.shape[0] != sn.shape[0] or fn.shape[0] % patches_per_image:
            raise ValueError(
                f"{fn.shape[0]} task-agnostic and {sn.shape[0]} task-specific rows do not form whole "
                f"images of {patches_per_image} patches"
            )
        # 1024 rows at a time: the (rows x P) products stay under 10 MB (P = 2048); as fast as 2048 rows
        # on 2 cores (177 ms for N = 3136), 512 rows are 5 % slower.
        agnostic = pool_thresholds(fn, pool_ag, chunk_size=1024)
        specific = pool_thresholds(sn, pool_sp, chunk_size=1024) if task_specific_positives else None
        return cls(fn, sn, agnostic, specific, patches_per_image, contrast_draw)

    @property
    def n_patches(self) -> int:
        return self.task_agnostic.shape[0]

    def _specific_thresholds(self) -> torch.Tensor:
        if self.specific_thresholds is None:
            raise ValueError("these inputs were built without task-specific positives")
        return self.specific_thresholds

    def masks(self, start: int, stop: int, *, task_specific: bool = True) -> PositiveMasks:
        """TA, TS and C for anchors [start, stop): a j is a positive of i when their similarity beats
        the threshold of either (symmetric), and never i itself. ``task_specific=False`` skips the
        (stop - start) x N product of the task-specific features and leaves TS as None."""
        agnostic = _beats_either_threshold(self.task_agnostic, self.agnostic_thresholds, start, stop)
        specific = None
        if task_specific:
            specific = _beats_either_threshold(self.task_specific, self._specific_thresholds(), start, stop)
        random_part = self.contrast_draw.rows(start, stop, self.patches_per_image, self.n_patches)
        contrast = torch.logical_or(agnostic, random_part.to(agnostic.device))
        # Entry (k, start + k) is anchor start + k against itself.
        contrast.diagonal(start).fill_(False)
        return PositiveMasks(agnostic, specific, contrast)


def _beats_either_threshold(
    features: torch.Tensor,
    thresholds: torch.Tensor,
    start: int,
    stop: int,
    first_column: int = 0,
    column_stop: int | None = None,
    *,
    out: torch.Tensor | None = None,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(stop - start, column_stop - first_column) bool: <x_i, x_j> > r_i or > r_j for anchors i in
    [start, stop) and patches j in [first_column, column_stop) (None: N), self pairs excluded.
    ``out`` receives the result; ``scratch`` (flat product-dtype and bool buffers, at least as
    large) holds the temporaries."""
    columns = slice(first_column, features.shape[0] if column_stop is None else column_stop)
    shape = (stop - start, columns.stop - columns.start)
    size = shape[0] * shape[1]
    if scratch is None:
        similarity = features[start:stop] @ features[columns].T
        other = None
    else:
        similarity = torch.mm(features[start:stop], features[columns].T, out=scratch[0][:size].view(shape))
        other = scratch[1][:size].view(shape)
    beats = torch.gt(similarity, thresholds[start:stop, None]) if out is None else torch.gt(
        similarity, thresholds[start:stop, None], out=out
    )
    if other is None:
        beats.logical_or_(torch.gt(similarity, thresholds[None, columns]))
    else:
        beats.logical_or_(torch.gt(similarity, thresholds[None, columns], out=other))
    if start - first_column < beats.shape[1]:
        beats.diagonal(start - first_column).fill_(False)
    return beats


_BITS = torch.arange(8, dtype=torch.uint8)


def _pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """(r, n) bool -> (r, ceil(n / 8)) uint8; bit k of byte m holds column 8 m + k."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy(), axis=1, bitorder="little"))
    return _pack_rows_torch(mask)


def _unpack_rows(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: (r, ceil(n / 8)) uint8 -> (r, n) bool."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), axis=1, count=n, bitorder="little")).view(torch.bool)
    return _unpack_rows_torch(packed, n)


# The same with torch operations, for GPUs (numpy's bit packing is faster on the CPU).
def _pack_rows_torch(mask: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(mask.shape[0], -(-mask.shape[1] // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, : mask.shape[1]] = mask
    return (padded.view(mask.shape[0], -1, 8) << _BITS.to(mask.device)).sum(-1, dtype=torch.uint8)


def _unpack_rows_torch(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed[..., None] >> _BITS.to(packed.device)) & 1
    return bits.view(packed.shape[0], -1)[:, :n].bool()


def image_masks(
    inputs: PositiveInputs, *, task_specific: bool = True, chunk_size: int | None = None, images: range | None = None
) -> Iterator[PositiveMasks]:
    """The masks of every image's hw anchors against all N patches, image after image (of
    ``images`` only, a run of consecutive images, when given: a rank's share of a gathered batch).

    Each yields (hw, N) bool TA, TS (None unless ``task_specific``) and C, equal to
    ``inputs.masks(image_start, image_start + hw)``; the same tensors are refilled for the next
    image (fewer large allocations: less heap fragmentation), so use them before asking for it.
    TA and TS are symmetric, so each pair of patches is compared once: a chunk of anchors (at most
    ``chunk_size`` and a quarter of the image) only against itself and the patches after it; the
    earlier part of the image comes from earlier chunks, that of earlier images from blocks kept
    bit-packed until their image comes. This about halves the products; kept blocks take at most
    N^2 / 32 bytes per mask (79 MB at N = 50,176). Images before ``images`` are compared with
    the anchors directly (nothing was kept for them).
    """
    hw, n = inputs.patches_per_image, inputs.n_patches
    n_images, device = n // hw, inputs.task_agnostic.device
    images = images or range(n_images)
    if device.type != "cpu":
        # On a GPU kernel launches are dear and the products cheap: each image's masks straight from
        # its (hw x N) products (every pair compared twice), a few kernels per image, instead of
        # hundreds of small bit-packing ones (measured on an H200: most of the loss's time at N = 50,176).
        yield from _image_masks_direct(inputs, task_specific=task_specific, images=images)
        return
    chunk = min(chunk_size or hw, -(-hw // 4))
    kinds = [(inputs.task_agnostic, inputs.agnostic_thresholds)]
    if task_specific:
        kinds.append((inputs.task_specific, inputs._specific_thresholds()))
    masks = [torch.empty(hw, n, dtype=torch.bool, device=device) for _ in kinds]
    contrast = torch.empty(hw, n, dtype=torch.bool, device=device)
    # Columns of later images per product: whole images, as many as the scratch (chunk x N) holds.
    block = max(1, chunk * n // (hw * hw)) * hw
    scratch = (
        torch.empty(max(chunk * n, hw * block), dtype=inputs.task_agnostic.dtype, device=device),
        torch.empty(max(chunk * n, hw * block), dtype=torch.bool, device=device),
    )
    saved: dict[tuple[int, int, int], torch.Tensor] = {}  # (kind, earlier image, later image) -> packed
    before = images.start * hw  # columns of the images before the first anchor image
    for image in images:
        image_start, image_stop = image * hw, (image + 1) * hw
        for kind, ((features, thresholds), mask) in enumerate(zip(kinds, masks)):
            for first in range(0, before, block):
                last = min(first + block, before)
                _beats_either_threshold(
                    features, thresholds, image_start, image_stop, first, last, out=mask[:, first:last], scratch=scratch
                )
            for earlier in range(images.start, image):
                mask[:, earlier * hw : (earlier + 1) * hw] = _unpack_rows(saved.pop((kind, earlier, image)), hw).T
            for start in range(image_start, image_stop, chunk):  # the image against itself, a triangle
                stop = min(start + chunk, image_stop)
                rows = slice(start - image_start, stop - image_start)
                mask[rows, image_start:start] = mask[: rows.start, start:stop].T
                _beats_either_threshold(
                    features, thresholds, start, stop, start, image_stop, out=mask[rows, start:image_stop], scratch=scratch
                )
            # Against the later images, all hw anchors at once: taller products run closer to the
            # BLAS's peak than chunk-high ones (on 2 cores 196 x 384 x 3136 reaches about 50 GFLOP/s, 784 x 384 x 784 about 58).
            for first in range(image_stop, n, block):
                last = min(first + block, n)
                _beats_either_threshold(
                    features, thresholds, image_start, image_stop, first, last, out=mask[:, first:last], scratch=scratch
                )
            for later in range(image + 1, images.stop):
                saved[(kind, image, later)] = _pack_rows(mask[:, later * hw : (later + 1) * hw])
        for start in range(image_start, image_stop, chunk):
            stop = min(start + chunk, image_stop)
            rows = slice(start - image_start, stop - image_start)
            random_part = inputs.contrast_draw.rows(start, stop, hw, n).to(device)
            torch.logical_or(masks[0][rows], random_part, out=contrast[rows])
        contrast.diagonal(image_start).fill_(False)
        yield PositiveMasks(masks[0], masks[1] if task_specific else None, contrast)


def _image_masks_direct(
    inputs: PositiveInputs, *, task_specific: bool = True, images: range | None = None
) -> Iterator[PositiveMasks]:
    """What :func:`image_masks` yields, each image's masks computed alone (the GPU path)."""
    hw = inputs.patches_per_image
    for image in images or range(inputs.n_patches // hw):
        yield inputs.masks(image * hw, (image + 1) * hw, task_specific=task_specific)


def hidden_positive_masks(
    task_agnostic: torch.Tensor,
    task_specific: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    patches_per_image: int,
    contrast_draw: ContrastDraw,
) -> PositiveMasks:
    """Full (N, N) masks TA, TS and C of a small batch — for inspection and tests.

    Shapes: task_agnostic (N, C), task_specific (N, D), pools (P, C) and (P, D).
    """
    inputs = PositiveInputs.build(
        task_agnostic, task_specific, pool_agnostic, pool_specific, patches_per_image, contrast_draw
    )
    return inputs.masks(0, inputs.n_patches)
