"""The Python API: load a checkpoint once, segment images of any size.

>>> import hpseg
>>> segmenter = hpseg.load("runs/my-run/checkpoints/last.pt")      # device="auto", weights=None
>>> labels = segmenter.segment(image)          # PIL image, (H, W, 3) uint8 array or (3, H, W) tensor
>>> labels.shape, labels.dtype                 # (H, W) int64, the image's own resolution
>>> segmenter.segment(image, head="linear")    # class ids from the linear probe
>>> segmenter.class_names                      # names of the dataset's classes
>>> out = segmenter.features(image)            # backbone f (C, h, w) and segmentation s (D, h, w)

The resizing and sliding-window geometry is :mod:`hpseg.predict`'s (the ``hpseg predict``
command uses this class). Which backbone weights are used, in order: ``weights=`` given here,
the checkpoint's ``backbone.weights`` file (looked up beside the checkpoint too, when the run
folder moved), the official weights (Hugging Face cache), or -- for a checkpoint trained on a
randomly initialised backbone -- the same random initialisation (deterministic).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpseg.backbones import Backbone, create_backbone
from hpseg.checkpoint import FORMAT, CheckpointError, read_torch_file
from hpseg.config import Config
from hpseg.data.transforms import normalize
from hpseg.method.model import HiddenPositivesModel
from hpseg.predict import Tiling, resample, resample_argmax, resized_shape, tile_and_average

__all__ = ["ImageFeatures", "Segmenter", "load", "to_uint8_image"]


# ---------------------------------------------------------------------------------------- images


def to_uint8_image(image: Any) -> torch.Tensor:
    """A PIL image, a numpy (H, W, 3) / (H, W) array or a (3, H, W) tensor -> (3, H, W) uint8 tensor.

    Arrays and tensors of uint8 are taken as 0..255, floating point ones as [0, 1]; an alpha
    channel (4 channels) is dropped and one channel is replicated to grey. PIL images of any
    mode go through :func:`hpseg.data.images.to_rgb` (16-bit, palette, CMYK, ...).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        from hpseg.data.images import to_rgb

        array = np.asarray(to_rgb(image))
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected an (H, W, 3) image array, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if tensor.shape[0] == 4:
        tensor = tensor[:3]
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if tensor.shape[-2] < 1 or tensor.shape[-1] < 1:
        raise ValueError(f"empty image of shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return tensor.contiguous()
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8).mul_(255).contiguous()
    if tensor.is_floating_point():
        return (tensor.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).contiguous()
    raise ValueError(f"image values of type {tensor.dtype}: expected uint8 (0..255) or float (0..1)")


def _to_pil(rgb: torch.Tensor) -> Any:
    from PIL import Image

    return Image.fromarray(rgb.permute(1, 2, 0).cpu().numpy(), "RGB")


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
    evaluation's Hungarian matching), ``n_clusters``, ``tiling`` (:class:`hpseg.predict.Tiling`),
    ``device``, ``batch_size`` (windows per forward pass), ``checkpoint``.
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
    ) -> None:
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
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return (f"Segmenter(checkpoint={self.checkpoint!r}, backbone={self.backbone.spec.name}, "
                f"classes={len(self.class_names)}, clusters={self.n_clusters}, size={self.tiling.size}, "
                f"window={self.tiling.window}, device={self.device})")

    # -- what the labels mean ------------------------------------------------------------------

    def label_names(self, head: str = "cluster") -> list[str]:
        """Names of the ids :meth:`segment` returns for ``head``: class names for the linear head
        or a mapped cluster head, ``"cluster k"`` otherwise."""
        _check_head(head)
        if head == "linear" or self.cluster_to_class is not None:
            return list(self.class_names)
        return [f"cluster {k}" for k in range(self.n_clusters)]

    # -- the work ------------------------------------------------------------------------------

    def _prepare(self, image: Any) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
        """-> (resized uint8 (3, H', W'), normalised padded float (3, Hp, Wp), (H, W), (H', W'))."""
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
        return resized, normalised, size, resized_size

    def _backbone_features(self, windows: torch.Tensor) -> torch.Tensor:
        from hpseg.runtime import autocast

        with autocast(self.device, self.amp_dtype):
            return self.backbone(windows).features.float()

    @torch.no_grad()
    def scores(self, image: Any, head: str = "cluster", kind: str = "logits") -> tuple[torch.Tensor, dict[str, Any]]:
        """Per-patch scores averaged over the windows: ((K, h, w), geometry).

        ``kind="logits"``: cluster head ``<s, c_k/||c_k||>`` / linear-probe logits (argmax =
        label); ``kind="cosine"``: cluster head cosine similarities (for the CRF).
        """
        _check_head(head)
        resized, normalised, size, resized_size = self._prepare(image)
        centroids = self.model.cluster_probe.centroids.float()

        def compute(windows: torch.Tensor) -> torch.Tensor:
            from hpseg.inference import centroid_scores, cosine_scores

            segmentation = self.model.segmentation(self._backbone_features(windows))
            if head == "linear":
                return self.model.linear_probe(segmentation)
            if kind == "cosine":
                return cosine_scores(segmentation, centroids)
            return centroid_scores(segmentation, centroids)

        grid = tile_and_average(normalised, self.tiling, compute, self.batch_size)
        return grid, {"size": size, "resized_size": resized_size, "resized": resized}

    @torch.no_grad()
    def segment(self, image: Any, head: str = "cluster", *, crf: bool = False) -> np.ndarray:
        """(H, W) int64 label map at the image's own resolution.

        ``head="cluster"``: cluster ids (or, with ``cluster_to_class``, the matched class ids;
        -1 for a cluster matched to no class); ``head="linear"``: the linear probe's class ids.
        ``crf=True`` refines with the dense CRF (needs ``pip install 'hpseg[crf]'``).
        """
        from hpseg.crf import cluster_probabilities, crf_refine_batch

        _check_head(head)
        grid, geometry = self.scores(image, head, kind="cosine" if crf and head == "cluster" else "logits")
        size, resized_size = geometry["size"], geometry["resized_size"]
        p = self.tiling.patch
        if crf:
            logits = cluster_probabilities(grid[None], log=True)[0] if head == "cluster" else grid
            at_resized = resample(logits, resized_size, (1.0 / p, 1.0 / p))
            refined = crf_refine_batch(geometry["resized"][None].cpu(), at_resized[None].cpu())[0].to(self.device)
            labels = resample_argmax(refined, size, (resized_size[0] / size[0], resized_size[1] / size[1]))
        else:
            scale = (resized_size[0] / (size[0] * p), resized_size[1] / (size[1] * p))
            labels = resample_argmax(grid, size, scale)
        if head == "cluster" and self.cluster_to_class is not None:
            table = torch.tensor(self.cluster_to_class, dtype=torch.int64, device=labels.device)
            labels = table[labels]
        return labels.cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def features(self, image: Any) -> ImageFeatures:
        """Backbone features f and segmentation features s of ``image`` (averaged over windows),
        for clustering them your own way."""
        _, normalised, size, resized_size = self._prepare(image)
        channels = self.backbone.embed_dim

        def compute(windows: torch.Tensor) -> torch.Tensor:
            features = self._backbone_features(windows)
            return torch.cat([features, self.model.segmentation(features)], dim=1)

        grid = tile_and_average(normalised, self.tiling, compute, self.batch_size)
        return ImageFeatures(grid[:channels].cpu(), grid[channels:].cpu(), size, resized_size, self.tiling.patch)


def _check_head(head: str) -> None:
    if head not in ("cluster", "linear"):
        raise ValueError(f"head must be 'cluster' or 'linear', got {head!r}")


# ---------------------------------------------------------------------------------------- loading


def _backbone_for(payload: dict[str, Any], config: Config, checkpoint: Path, weights: str | None,
                  say: Callable[[str], None]) -> Backbone:
    """The backbone a checkpoint was trained on (see the module docstring for the order)."""
    name = (payload.get("backbone") or {}).get("name") or config.backbone.name
    if weights:
        return create_backbone(name, weights=weights)
    stored = (payload.get("backbone") or {}).get("weights") or config.backbone.weights
    if stored:
        path = Path(stored)
        if not path.is_file() and (checkpoint.parent / path.name).is_file():
            path = checkpoint.parent / path.name  # the run folder moved: the file travels beside it
        return create_backbone(name, weights=path)
    pretrained = (payload.get("backbone") or {}).get("pretrained", config.backbone.pretrained)
    if pretrained:
        return create_backbone(name, pretrained=True)
    # A random backbone is not stored in the checkpoint; hpseg's random initialisation is
    # deterministic (a fixed seed), so this rebuilds the network training used.
    say(f"{checkpoint}: the backbone {name!r} was randomly initialised; rebuilding the same random "
        "network (exact with the same torch and timm versions)")
    return create_backbone(name, pretrained=False)


def read_mapping(path: str | Path, n_clusters: int, n_classes: int, step: Any = None) -> list[int]:
    """The cluster -> class list of an evaluation's ``results.json`` (key ``cluster_to_class``)
    or of a JSON list; checked against the model's sizes and, when both say, the step."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the cluster->class mapping {path}: {error}") from None
    if isinstance(value, dict):
        if "cluster_to_class" not in value:
            raise ValueError(f"{path} has no 'cluster_to_class' entry (expected the results.json of `hpseg eval`)")
        if step is not None and value.get("step") is not None and value["step"] != step:
            raise ValueError(f"{path} was computed for the checkpoint of step {value['step']}, "
                             f"not this one (step {step}): evaluate this checkpoint with `hpseg eval`")
        value = value["cluster_to_class"]
    if not isinstance(value, list) or len(value) != n_clusters or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{path}: cluster_to_class must be a list of {n_clusters} integers (one class per cluster)")
    if any(v < -1 or v >= n_classes for v in value):
        raise ValueError(f"{path}: cluster_to_class holds ids outside -1..{n_classes - 1}")
    return value


def find_mapping(checkpoint: Path, payload: dict[str, Any], crf: bool = False) -> Path | None:
    """An evaluation of this checkpoint beside its run: ``<run>/eval-<kind>[-crf]/results.json``
    (or ``results.json`` beside the checkpoint) recorded for the same file name, kind and step."""
    kind = payload.get("kind", "checkpoint")
    run = checkpoint.parent.parent
    names = [f"eval-{kind}-crf", f"eval-{kind}"] if crf else [f"eval-{kind}", f"eval-{kind}-crf"]
    candidates = [run / name / "results.json" for name in names] + [checkpoint.parent / "results.json"]
    for candidate in candidates:
        try:
            results = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(results, dict) and "cluster_to_class" in results
                and Path(str(results.get("checkpoint", ""))).name == checkpoint.name
                and results.get("step") == payload.get("step")):
            return candidate
    return None


def load(
    checkpoint: str | Path,
    device: str = "auto",
    weights: str | None = None,
    *,
    mapping: str | Path | None = None,
    size: int | None = None,
    window: int | None = None,
    batch_size: int = 8,
    echo: Callable[[str], None] | None = None,
) -> Segmenter:
    """Load a checkpoint for segmenting images.

    Args:
        checkpoint: an hpseg checkpoint (``checkpoints/last.pt`` / ``best.pt`` of a run, or one
            written by ``hpseg import-checkpoint``), or an authors' reference checkpoint (converted
            in memory).
            Or a folder written by ``hpseg export --format hub``, or ``"hf://owner/name[@revision]"``
            (that folder on the Hugging Face Hub, through its cache; ``mapping="auto"`` then uses
            the mapping stored in it).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
        weights: local backbone weights file, overriding the checkpoint's.
        mapping: cluster -> class mapping for the cluster head: a ``results.json`` of
            ``hpseg eval`` (or a JSON list), ``"auto"`` to use an evaluation of this checkpoint
            found in its run folder if there is one, None for raw cluster ids.
        size: shorter side images are resized to (default: the checkpoint's ``data.val_size``;
            0 keeps images as they are).
        window: sliding-window side (default ``size``; 0 = whole images in one pass).
        echo: where notices go (default: warnings).
    """
    from hpseg.export.hub import hub_folder, load_hub
    from hpseg.runtime import amp_dtype, resolve_device

    say = echo or (lambda message: warnings.warn(message, stacklevel=3))
    folder = hub_folder(checkpoint)  # a folder of `hpseg export --format hub`, or hf://owner/name
    if folder is not None:
        return load_hub(folder, device=device, weights=weights, mapping=mapping, size=size, window=window,
                        batch_size=batch_size, label=str(checkpoint))
    path = Path(checkpoint)
    payload = read_torch_file(path)
    if isinstance(payload, dict) and payload.get("format") != FORMAT and "net_model_state_dict" in payload:
        from hpseg.reference_checkpoint import convert_reference

        converted = convert_reference(payload, path)
        payload, backbone = converted.checkpoint, converted.backbone(weights)
        say(f"{path}: an authors' reference checkpoint, converted in memory "
            f"(backbone {converted.backbone_name}; `hpseg import-checkpoint` converts it once for all)")
    else:
        from hpseg.checkpoint import load_checkpoint

        payload = load_checkpoint(path)
        backbone = None
    try:
        config = Config.from_dict(payload["config"])
        state = payload["model"]
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: incomplete hpseg checkpoint ({error})") from None
    torch_device = resolve_device(device)
    if backbone is None:
        backbone = _backbone_for(payload, config, path, weights, say)
    model = HiddenPositivesModel(backbone.embed_dim, config.method.dim, config.method.n_classes, config.method.dropout)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the model weights do not fit backbone {backbone.spec.name!r} and the "
                              f"config (dim {config.method.dim}, {config.method.n_classes} classes): {error}") from None
    n_classes = config.method.n_classes
    class_names = list(payload.get("class_names") or [f"class {k}" for k in range(n_classes)])

    cluster_to_class, source = None, None
    if mapping == "auto":
        found = find_mapping(path, payload)
        if found is not None:
            mapping, source = found, str(found)
            say(f"using the cluster->class mapping of the evaluation in {found}")
        else:
            mapping = None
    if mapping is not None:
        cluster_to_class = read_mapping(mapping, model.cluster_probe.centroids.shape[0], n_classes, payload.get("step"))
        source = str(mapping)

    val_size = size if size is not None else int(config.data.val_size)
    tiling = Tiling.create(val_size, window, backbone.patch_size)
    backbone.to(torch_device)
    model.to(torch_device)
    return Segmenter(
        model, backbone, class_names=class_names, tiling=tiling, device=torch_device,
        amp_dtype=amp_dtype(config.train.amp, torch_device), cluster_to_class=cluster_to_class,
        mapping_source=source, checkpoint=str(path), batch_size=batch_size,
    )
