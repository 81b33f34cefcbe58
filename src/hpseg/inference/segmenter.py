"""The Python API: load a checkpoint once, segment images of any size.

>>> import hpseg
>>> segmenter = hpseg.load("runs/my-run/checkpoints/last.pt")      # device="auto", weights=None
>>> labels = segmenter.segment(image)          # PIL image, (H, W, 3) uint8 array or (3, H, W) tensor
>>> for labels in segmenter.segment_many(images): ...   # many images: their windows share backbone passes
>>> labels.shape, labels.dtype                 # (H, W) int64, the image's own resolution
>>> segmenter.segment(image, head="linear")    # class ids from the linear probe
>>> segmenter.class_names                      # names of the dataset's classes
>>> out = segmenter.features(image)            # backbone f (C, h, w) and segmentation s (D, h, w)

The resizing and sliding-window geometry is :mod:`hpseg.inference.tiling`'s (the ``hpseg
predict`` command uses this class). Every source a user can name (checkpoint file, run folder,
hub folder, ``hf://`` name, authors' checkpoint) is read by the one loader,
:func:`hpseg.checkpoints.trained.load_trained`, whose docstring says which backbone weights are
used.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hpseg.backbones import Backbone
from hpseg.checkpoints.trained import TrainedModel, load_trained
from hpseg.data.images import to_rgb
from hpseg.data.transforms import normalize
from hpseg.errors import InvalidInputError
from hpseg.inference.crf import crf_probabilities
from hpseg.inference.crf_numpy import dense_crf
from hpseg.inference.crf_pool import CRFPool
from hpseg.inference.label_maps import cluster_crf_log_probs
from hpseg.inference.tiling import (
    Tiling,
    resample,
    resample_argmax,
    resized_shape,
    tile_and_average,
    tile_and_average_many,
)
from hpseg.method.model import HiddenPositivesModel
from hpseg.method.probes import centroid_scores
from hpseg.runtime import autocast, default_crf_workers

__all__ = ["HEADS", "ImageFeatures", "Segmenter", "check_head", "from_trained", "load", "to_uint8_image"]

logger = logging.getLogger(__name__)

#: The two heads that label patches: the cluster probe (unsupervised) and the linear probe.
HEADS = ("cluster", "linear")


# ---------------------------------------------------------------------------------------- images


def to_uint8_image(image: Any) -> torch.Tensor:
    """A PIL image, a numpy (H, W, 3) / (H, W) array or a (3, H, W) tensor -> (3, H, W) uint8 tensor.

    Arrays and tensors of uint8 are taken as 0..255, floating point ones as [0, 1] (values outside
    are refused: ValueError); an alpha
    channel (4 channels) is dropped and one channel is replicated to grey. PIL images of any
    mode go through :func:`hpseg.data.images.to_rgb` (16-bit, palette, CMYK, ...).
    """
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image))
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise InvalidInputError(f"expected an (H, W, 3) image array, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise InvalidInputError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if tensor.shape[0] == 4:
        tensor = tensor[:3]
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if tensor.shape[-2] < 1 or tensor.shape[-1] < 1:
        raise InvalidInputError(f"empty image of shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return tensor.contiguous()
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8).mul_(255).contiguous()
    if tensor.is_floating_point():
        return _float_to_uint8(tensor.float())
    raise InvalidInputError(f"image values of type {tensor.dtype}: expected uint8 (0..255) or float (0..1)")


def _float_to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    """A float image of values in [0, 1] as uint8; values outside (0..255 in a float array, NaN)
    are refused rather than clipped into a white image."""
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidInputError("the float image holds NaN or infinite values: expected values in [0, 1]")
    low, high = float(tensor.min()), float(tensor.max())
    if low < 0.0 or high > 1.0:
        hint = " (0..255? pass a uint8 array, or divide by 255)" if high <= 255.0 and low >= 0.0 else ""
        raise InvalidInputError(f"float image values must lie in [0, 1], these range over [{low:g}, {high:g}]{hint}")
    return (tensor * 255.0).round().to(torch.uint8).contiguous()


@dataclass
class ImageFeatures:
    """Per-patch features of one image, on the patch grid of the resized, padded image.

    Attributes:
        backbone: (C, h, w) task-agnostic backbone features f.
        segmentation: (D, h, w) segmentation features s of the trained head S.
        image_size: (H, W) of the input image.
        resized_size: (H', W') after resizing the shorter side; patch (i, j) covers the resized
            pixels [i p, (i+1) p) x [j p, (j+1) p), p = ``patch_size``; the grid may reach a
            little past the resized image (padding to whole patches).
        patch_size: p.
    """

    backbone: torch.Tensor
    segmentation: torch.Tensor
    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    patch_size: int


# ---------------------------------------------------------------------------------------- Segmenter


class Segmenter:
    """A trained HP model with its frozen backbone, ready to segment images.

    Build it with :func:`load`. Attributes: ``class_names`` (the dataset's classes, i.e. what
    the linear probe predicts), ``cluster_to_class`` (None, or the class of each cluster from an
    evaluation's Hungarian matching), ``n_clusters``, ``tiling`` (:class:`hpseg.inference.tiling.Tiling`),
    ``device``, ``batch_size`` (windows per forward pass), ``checkpoint``, ``crf`` (whether
    :meth:`segment` refines with the dense CRF by default), ``default_head`` (the head
    :meth:`segment` uses when none is named: ``"cluster"``, or ``"linear"`` for a released model,
    whose clusters have no class mapping until an evaluation supplies one), ``random_backbone``
    (whether the backbone is a random initialisation, whose segments of real photos mean nothing),
    ``crf_workers`` (processes that refine the images of :meth:`segment_many` with the CRF; None:
    the cores available to this process, 0: in this process).
    """

    def __init__(
        self,
        model: HiddenPositivesModel,
        backbone: Backbone,
        *,
        class_names: list[str],
        tiling: Tiling,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        cluster_to_class: list[int] | None = None,
        mapping_source: str | None = None,
        checkpoint: str | None = None,
        batch_size: int = 8,
        crf: bool = False,
        default_head: str = "cluster",
        random_backbone: bool = False,
        crf_workers: int | None = None,
    ) -> None:
        check_head(default_head)
        self.model = model.eval()
        self.backbone = backbone
        self.class_names = list(class_names)
        self.tiling = tiling
        self.device = device
        self.amp_dtype = amp_dtype
        self.n_clusters = int(model.cluster_probe.centroids.shape[0])
        self.cluster_to_class = None if cluster_to_class is None else [int(v) for v in cluster_to_class]
        self.mapping_source = mapping_source
        self.checkpoint = checkpoint
        if batch_size < 1:
            raise InvalidInputError(f"batch_size={batch_size}: windows per forward pass must be at least 1")
        self.batch_size = batch_size
        self.crf = crf
        self.default_head = default_head
        self.random_backbone = random_backbone
        self.crf_workers = crf_workers

    def __repr__(self) -> str:
        return (f"Segmenter(checkpoint={self.checkpoint!r}, backbone={self.backbone.spec.name}, "
                f"classes={len(self.class_names)}, clusters={self.n_clusters}, size={self.tiling.size}, "
                f"window={self.tiling.window}, device={self.device})")

    # -- what the labels mean ------------------------------------------------------------------

    def label_names(self, head: str | None = None) -> list[str]:
        """Names of the ids :meth:`segment` returns for ``head`` (None: ``default_head``): class
        names for the linear head or a mapped cluster head, ``"cluster k"`` otherwise."""
        head = self._head(head)
        if head == "linear" or self.cluster_to_class is not None:
            return list(self.class_names)
        return [f"cluster {k}" for k in range(self.n_clusters)]

    def _head(self, head: str | None) -> str:
        head = self.default_head if head is None else head
        check_head(head)
        return head

    # -- the work ------------------------------------------------------------------------------

    def _prepare(self, image: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """-> (normalised padded float (3, Hp, Wp), geometry: {"size": (H, W), "resized_size":
        (H', W'), "resized": uint8 (3, H', W')})."""
        rgb = to_uint8_image(image).to(self.device)
        size = (int(rgb.shape[-2]), int(rgb.shape[-1]))
        resized_size = resized_shape(*size, self.tiling.size)
        if resized_size != size:
            resized = F.interpolate(rgb[None].float(), size=resized_size, mode="bilinear", align_corners=False,
                                    antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
        else:
            resized = rgb
        normalised = normalize(resized)
        padded_h, padded_w = self.tiling.padded(*resized_size)
        if (padded_h, padded_w) != resized_size:
            normalised = F.pad(normalised[None], (0, padded_w - resized_size[1], 0, padded_h - resized_size[0]),
                               mode="replicate")[0]
        return normalised, {"size": size, "resized_size": resized_size, "resized": resized}

    def _backbone_features(self, windows: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return self.backbone(windows).features.float()

    def _window_scores(self, head: str, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """(B, 3, wh, ww) normalised windows -> (B, X, wh/p, ww/p) per-patch values of ``kind``
        (see :meth:`scores`)."""
        centroids = self.model.cluster_probe.centroids.float()

        def compute(windows: torch.Tensor) -> torch.Tensor:
            segmentation = self.model.segmentation(self._backbone_features(windows))
            if kind == "segmentation":
                return segmentation
            if head == "linear":
                return self.model.linear_probe(segmentation)
            return centroid_scores(segmentation, centroids, cosine=kind == "cosine")

        return compute

    @torch.no_grad()
    def scores(self, image: Any, head: str = "cluster", kind: str = "logits") -> tuple[torch.Tensor, dict[str, Any]]:
        """Per-patch scores averaged over the windows: ((K, h, w), geometry).

        ``kind="logits"``: cluster head ``<s, c_k/||c_k||>`` / linear-probe logits (argmax =
        label); ``kind="cosine"``: cluster head cosine similarities; ``kind="segmentation"``:
        the segmentation features s themselves, (D, h, w) (the CRF's cluster unaries need them
        upsampled before the cosine, as the reference).
        """
        check_head(head)
        if kind not in ("logits", "cosine", "segmentation"):
            raise InvalidInputError(f"kind must be 'logits', 'cosine' or 'segmentation', got {kind!r}")
        normalised, geometry = self._prepare(image)
        return tile_and_average(normalised, self.tiling, self._window_scores(head, kind), self.batch_size), geometry

    @torch.no_grad()
    def segment(self, image: Any, head: str | None = None, *, crf: bool | None = None) -> np.ndarray:
        """(H, W) int64 label map at the image's own resolution.

        ``head`` None: the segmenter's ``default_head``; ``head="cluster"``: cluster ids (or, with ``cluster_to_class``, the matched class ids;
        -1 for a cluster matched to no class); ``head="linear"``: the linear probe's class ids.
        ``crf=True`` refines with the dense CRF (needs ``pip install 'hpseg[crf]'``); None: the
        segmenter's ``crf`` setting (``hpseg.load(..., crf=...)``).
        """
        head = self._head(head)
        crf = self.crf if crf is None else crf
        grid, geometry = self.scores(image, head, kind=_label_kind(head, crf))
        if crf:
            return self._refined_labels(dense_crf(*self._crf_job(grid, geometry, head)), geometry, head)
        return self._labels(grid, geometry, head)

    def segment_many(self, images: Iterable[Any], head: str | None = None, *,
                     crf: bool | None = None) -> Iterator[np.ndarray]:
        """:meth:`segment` of each image in ``images``, yielded in order, with the windows of
        consecutive images sharing backbone passes (``batch_size`` windows each): faster than
        one image at a time when an image has fewer windows than ``batch_size``.

        ``images`` is read lazily (a generator of files read one by one is fine) and each label
        map is yielded as soon as its last window is computed, so memory stays that of
        ``batch_size`` windows and the images they come from. Same label maps as :meth:`segment`
        (the backbone's float rounding aside, which may differ with the batch's composition).

        With the CRF, images are refined in ``crf_workers`` processes (at most twice as many
        images in flight) while the backbone goes on with the next ones.
        """
        head = self._head(head)  # now, not at the first image
        return self._segment_stream(images, head, self.crf if crf is None else crf)

    @torch.no_grad()
    def _segment_stream(self, images: Iterable[Any], head: str, crf: bool) -> Iterator[np.ndarray]:
        geometries: deque[dict[str, Any]] = deque()  # of the images handed to the tiling, not yet labelled

        def padded_images() -> Iterator[torch.Tensor]:
            for image in images:
                normalised, geometry = self._prepare(image)
                geometries.append(geometry)
                yield normalised

        compute = self._window_scores(head, _label_kind(head, crf))
        grids = tile_and_average_many(padded_images(), self.tiling, compute, self.batch_size)
        if not crf:
            for grid in grids:
                yield self._labels(grid, geometries.popleft(), head)
            return

        def crf_jobs() -> Iterator[tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]]:
            for grid in grids:
                geometry = geometries.popleft()
                yield geometry, self._crf_job(grid, geometry, head)

        workers = default_crf_workers(0) if self.crf_workers is None else self.crf_workers
        with CRFPool(workers, task=dense_crf) as pool:
            for geometry, refined in pool.map(crf_jobs()):
                yield self._refined_labels(refined, geometry, head)

    def _crf_job(self, grid: torch.Tensor, geometry: dict[str, Any], head: str) -> tuple[np.ndarray, np.ndarray]:
        """The CRF's input for one image's patch grid of :func:`_label_kind` scores: ((H', W', 3)
        uint8 resized image, (K, H', W') float32 probabilities at its size)."""
        resized_size, p = geometry["resized_size"], self.tiling.patch
        at_resized = resample(grid, resized_size, (1.0 / p, 1.0 / p))[None]
        if head == "cluster":
            # The reference's order: s upsampled first, then log_softmax(2 cos) (see inference.label_maps).
            at_resized = cluster_crf_log_probs(at_resized, self.model.cluster_probe.centroids.float())
        image = geometry["resized"].permute(1, 2, 0).cpu().numpy()
        return image, crf_probabilities(at_resized.cpu(), resized_size)[0]

    def _refined_labels(self, refined: np.ndarray, geometry: dict[str, Any], head: str) -> np.ndarray:
        """(H, W) int64 labels from one image's (K, H', W') CRF-refined probabilities."""
        size, resized_size = geometry["size"], geometry["resized_size"]
        scale = (resized_size[0] / size[0], resized_size[1] / size[1])
        return self._named(resample_argmax(torch.from_numpy(refined).to(self.device), size, scale), head)

    def _labels(self, grid: torch.Tensor, geometry: dict[str, Any], head: str) -> np.ndarray:
        """(H, W) int64 labels from one image's patch grid of logits, without the CRF."""
        size, resized_size, p = geometry["size"], geometry["resized_size"], self.tiling.patch
        scale = (resized_size[0] / (size[0] * p), resized_size[1] / (size[1] * p))
        return self._named(resample_argmax(grid, size, scale), head)

    def _named(self, labels: torch.Tensor, head: str) -> np.ndarray:
        """Cluster ids mapped to classes when the segmenter has a mapping; as int64 numpy."""
        if head == "cluster" and self.cluster_to_class is not None:
            table = torch.tensor(self.cluster_to_class, dtype=torch.int64, device=labels.device)
            labels = table[labels]
        return labels.cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def features(self, image: Any) -> ImageFeatures:
        """Backbone features f and segmentation features s of ``image`` (averaged over windows),
        for clustering them your own way."""
        normalised, geometry = self._prepare(image)
        channels = self.backbone.embed_dim

        def compute(windows: torch.Tensor) -> torch.Tensor:
            features = self._backbone_features(windows)
            return torch.cat([features, self.model.segmentation(features)], dim=1)

        grid = tile_and_average(normalised, self.tiling, compute, self.batch_size)
        return ImageFeatures(grid[:channels].cpu(), grid[channels:].cpu(), geometry["size"], geometry["resized_size"],
                             self.tiling.patch)


def _label_kind(head: str, crf: bool) -> str:
    """The :meth:`Segmenter.scores` kind labelling needs: the CRF's cluster unaries start from s."""
    return "segmentation" if crf and head == "cluster" else "logits"


def check_head(head: str) -> None:
    """Raise :class:`~hpseg.errors.InvalidInputError` (a ``ValueError``) unless ``head`` is one of :data:`HEADS`."""
    if head not in HEADS:
        raise InvalidInputError(f"head must be 'cluster' or 'linear', got {head!r}")


# ---------------------------------------------------------------------------------------- loading


def _cluster_mapping(trained: TrainedModel, mapping: str | Path | None, crf: bool) -> tuple[list[int] | None, str | None]:
    """(cluster -> class list, where it came from) for ``load``'s ``mapping`` argument."""
    if mapping is None:
        return None, None
    if mapping == "auto":
        return trained.auto_mapping(crf) or (None, None)
    return trained.read_mapping(mapping), str(mapping)


def load(
    checkpoint: str | Path,
    device: str = "auto",
    weights: str | None = None,
    *,
    mapping: str | Path | None = None,
    crf: bool = False,
    size: int | None = None,
    window: int | None = None,
    batch_size: int = 8,
) -> Segmenter:
    """Load a trained model for segmenting images (:func:`hpseg.checkpoints.trained.load_trained`).

    Args:
        checkpoint: what names the model (:mod:`hpseg.checkpoints.sources`): an hpseg checkpoint
            (``checkpoints/last.pt`` / ``best.pt`` of a run, or one written by ``hpseg
            import-checkpoint``), a run folder (the checkpoint its ``train.selection`` chose), an
            authors' checkpoint (converted in memory), a folder written by ``hpseg export
            --format hub``, or ``"hf://owner/name[@revision]"`` (such a folder on the Hugging
            Face Hub, through its cache).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...; the precision
            follows the device (a model trained in float16 on a GPU runs in float32 on the CPU).
        weights: local backbone weights file, overriding the checkpoint's.
        mapping: cluster -> class mapping for the cluster head: a ``results.json`` of
            ``hpseg eval`` (or a JSON list), ``"auto"`` to use a hub folder's stored mapping or an
            evaluation of this checkpoint found beside it if there is one, None for raw cluster ids.
        crf: refine with the dense CRF by default in :meth:`Segmenter.segment`; ``"auto"``
            then prefers the mapping of a CRF evaluation (matched on CRF-refined maps).
        size: shorter side images are resized to (default: the checkpoint's ``data.val_size``, a
            hub folder's ``tiling.size``; 0 keeps images as they are).
        window: sliding-window side (default ``size``; 0 = whole images in one pass).

    Notices (a converted authors' checkpoint, a rebuilt random backbone, the mapping used) go
    to the ``hpseg`` logger.
    """
    return from_trained(load_trained(checkpoint, device, weights), mapping=mapping, crf=crf, size=size,
                        window=window, batch_size=batch_size)


def from_trained(trained: TrainedModel, *, mapping: str | Path | None = None, crf: bool = False,
                 size: int | None = None, window: int | None = None, batch_size: int = 8) -> Segmenter:
    """The :class:`Segmenter` of a loaded model (the arguments are :func:`load`'s)."""
    cluster_to_class, source = _cluster_mapping(trained, mapping, crf)
    released = trained.checkpoint.released
    if released is not None:
        logger.info("%s: the authors' released model (%s); it segments with the linear head by default, whose "
                    "outputs are the %d classes of %s; the cluster head gives cluster ids unless a mapping from "
                    "an evaluation is supplied (--mapping results.json of `hpseg eval %s`)", released.name,
                    released.description, released.n_classes, released.dataset, released.name)
    val_size = size if size is not None else trained.checkpoint.default_size
    return Segmenter(
        trained.model, trained.backbone, class_names=trained.class_names,
        tiling=Tiling.create(val_size, window, trained.backbone.patch_size), device=trained.device,
        amp_dtype=trained.amp_dtype, cluster_to_class=cluster_to_class, mapping_source=source,
        checkpoint=released.name if released else trained.checkpoint.label, batch_size=batch_size, crf=crf,
        default_head="linear" if released else "cluster",
        random_backbone=trained.random_backbone,
    )
