"""``hpseg export --format onnx``: the whole segmenter as one ONNX graph.

The graph holds the ImageNet normalisation, the frozen backbone (through ``Backbone.forward``;
a DINO-style backbone's position interpolation -- bicubic with DINO's scale factor -- is
exported as the equivalent :func:`exportable_dino_position_embedding`, since ``F.interpolate``
with a scale factor does not export with a dynamic grid), the segmentation head S and both
heads::

    image          (B, 3, H, W) uint8 RGB, 0..255; H and W multiples of the patch size p
    cluster_logits (B, K, H/p, W/p) float32  <s, c_k / ||c_k||>, as evaluation and predict score
    linear_logits  (B, n_classes, H/p, W/p) float32  the linear probe's logits
    cluster_labels (B, H, W) int64  argmax of cluster_logits upsampled bilinearly to (H, W),
                   mapped to class ids by the Hungarian cluster->class mapping when the export
                   had one (-1 = cluster matched to no class)
    linear_labels  (B, H, W) int64  argmax of linear_logits upsampled bilinearly to (H, W)

Batch, H and W are dynamic. The resize / tiling / averaging of ``hpseg predict`` happens outside
the graph (in :mod:`hpseg.export.onnx_runner`, numpy only), from the patch logits; the label outputs
are the single-pass maps of an image already at the wanted size. The contract, the tiling
settings, class names, colours and the mapping are stored as JSON in the model's metadata
(key ``hpseg``). The dense CRF is not part of the graph.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from hpseg import __version__
from hpseg.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone
from hpseg.backbones import vit as vit_backbone
from hpseg.data.transforms import normalize
from hpseg.export import missing_extra
from hpseg.export.onnx_runner import OnnxModelError, read_metadata
from hpseg.files import OutputFolderError
from hpseg.inference.segmenter import Segmenter
from hpseg.method.probes import centroid_scores
from hpseg.visualize import palette

#: Opset of the exported graphs: 18 is the first with Resize(antialias=1), which timm's
#: antialiased bicubic position-embedding resampling (DINOv2-style backbones) needs.
OPSET = 18
METADATA_KEY = "hpseg"
FORMAT = "hpseg-onnx"
OUTPUTS = ("cluster_logits", "linear_logits", "cluster_labels", "linear_labels")
#: Largest image side (pixels) the exported dynamic shapes allow.
MAX_SIDE = 8192


class SegmenterGraph(nn.Module):
    """hpseg's inference path as a module of one tensor: uint8 images -> logits and label maps.

    Shapes: image (B, 3, H, W) uint8 -> cluster_logits (B, K, h, w), linear_logits
    (B, n_classes, h, w), cluster_labels and linear_labels (B, H, W) int64; h, w = H/p, W/p.
    """

    def __init__(self, segmenter: Segmenter) -> None:
        super().__init__()
        self.backbone = segmenter.backbone
        self.segmentation = segmenter.model.segmentation
        self.linear_probe = segmenter.model.linear_probe
        self.register_buffer("centroids", segmenter.model.cluster_probe.centroids.detach().float().clone())
        mapping = segmenter.cluster_to_class
        table = torch.arange(self.centroids.shape[0]) if mapping is None else torch.tensor(mapping)
        self.register_buffer("cluster_to_class", table.to(torch.int64))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(normalize(image)).features
        segmentation = self.segmentation(features)
        cluster = centroid_scores(segmentation, self.centroids, cosine=False)
        linear = self.linear_probe(segmentation).float()
        size = (image.shape[-2], image.shape[-1])
        clusters = F.interpolate(cluster, size=size, mode="bilinear", align_corners=False).argmax(1)
        classes = F.interpolate(linear, size=size, mode="bilinear", align_corners=False).argmax(1)
        return cluster, linear, self.cluster_to_class[clusters], classes


def metadata(segmenter: Segmenter, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What a user of the .onnx file needs besides the graph (stored as JSON in its metadata)."""
    p = segmenter.tiling.patch
    names = {head: segmenter.label_names(head) for head in ("cluster", "linear")}
    return {
        "format": FORMAT,
        "version": 1,
        "hpseg_version": __version__,
        "opset": OPSET,
        "input": {
            "name": "image", "dtype": "uint8", "layout": "NCHW", "channels": "RGB", "range": "0..255",
            "normalisation": f"inside the graph: (image / 255 - mean) / std, mean {list(IMAGENET_MEAN)}, "
                             f"std {list(IMAGENET_STD)}",
            "size_rule": f"batch, H and W dynamic; H and W multiples of the patch size {p}, at most {MAX_SIDE}",
        },
        "outputs": {
            "cluster_logits": "(B, K, H/p, W/p) float32 <s, c_k/||c_k||>",
            "linear_logits": "(B, n_classes, H/p, W/p) float32",
            "cluster_labels": "(B, H, W) int64: argmax of bilinearly upsampled cluster_logits"
                              + (", mapped to class ids (-1 = unmatched)" if segmenter.cluster_to_class else ""),
            "linear_labels": "(B, H, W) int64 class ids",
        },
        "tiling": {"size": segmenter.tiling.size, "window": segmenter.tiling.window, "patch": p},
        "backbone": segmenter.backbone.spec.name,
        "checkpoint": str(checkpoint or segmenter.checkpoint),
        "class_names": list(segmenter.class_names),
        "label_names": names,
        "colours": {head: palette(len(value)).tolist() for head, value in names.items()},
        "n_clusters": segmenter.n_clusters,
        "cluster_to_class": segmenter.cluster_to_class,
        "mapping_source": segmenter.mapping_source,
    }


def _trace(graph: SegmenterGraph, path: Path, patch: int) -> None:
    """Export with torch.export (dynamo): it keeps H and W symbolic through the position
    embedding interpolation, which the TorchScript exporter cannot (antialiased bicubic)."""
    batch = Dim("batch", min=1, max=4096)
    rows = Dim("rows", min=1, max=MAX_SIDE // patch)
    cols = Dim("cols", min=1, max=MAX_SIDE // patch)
    example = torch.zeros((2, 3, 2 * patch, 3 * patch), dtype=torch.uint8)
    torch.onnx.export(
        graph, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=["image"],
        output_names=list(OUTPUTS), dynamic_shapes={"image": {0: batch, 2: patch * rows, 3: patch * cols}},
        verbose=False, external_data=False,
    )


def export_onnx(segmenter: Segmenter, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write ``segmenter`` (an :class:`hpseg.inference.segmenter.Segmenter`) to ``out`` atomically.

    Returns the path written. Raises ImportError naming ``hpseg[onnx]`` without onnx.
    """
    onnx = _import_onnx()
    out = check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = SegmenterGraph(segmenter).to("cpu").eval()
    info = metadata(segmenter, checkpoint)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        traced = Path(scratch) / "traced.onnx"
        with torch.no_grad(), exportable_positions(graph.backbone):
            _trace(graph, traced, segmenter.tiling.patch)
        model = onnx.load(str(traced))
        _set_metadata(model, info)
        onnx.checker.check_model(model)
        final = Path(scratch) / "model.onnx"
        onnx.save(model, str(final))
        os.replace(final, out)
    return out


def _import_onnx() -> Any:
    try:
        import onnx  # lazy: an optional extra, and importing it costs time
    except ImportError as error:
        raise missing_extra("onnx", "onnx", error) from None
    return onnx


def check_destination(out: str | Path) -> Path:
    """``out`` if :func:`export_onnx` may write it: a new file, or a model an earlier export wrote
    (its ``hpseg`` metadata marks it) -- the rule of every hpseg output
    (:func:`hpseg.files.claim_output_folder`) for the one file this export writes. Raises
    :class:`hpseg.files.OutputFolderError` naming ``out`` otherwise, before the export runs."""
    out = Path(out)
    if out.is_dir():
        raise OutputFolderError(f"--out {out} is a folder: --format onnx writes one file; give the file's name, "
                                f"e.g. --out {out / 'model.onnx'}")
    if out.exists() and not _exported_by_hpseg(out):
        raise OutputFolderError(f"--out {out} exists and is not an ONNX model written by `hpseg export --format onnx` "
                                "(no hpseg metadata): it would be replaced; pick another --out file, or move it away")
    return out


def _exported_by_hpseg(path: Path) -> bool:
    """Whether ``path`` is an ONNX model whose hpseg metadata the runner's reader accepts."""
    try:
        model = _import_onnx().load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - onnx raises protobuf's and its own errors: not a model, not ours
        return False
    try:
        read_metadata(path, {prop.key: prop.value for prop in model.metadata_props}.get(METADATA_KEY))
    except OnnxModelError:
        return False
    return True


def _set_metadata(model: Any, info: dict[str, Any]) -> None:
    """Metadata: the JSON (for programs) and the input contract in words (for people)."""
    del model.metadata_props[:]
    entries = {
        METADATA_KEY: json.dumps(info),
        "input_contract": f"image: {info['input']['dtype']} {info['input']['layout']} {info['input']['channels']} "
                          f"{info['input']['range']}; {info['input']['size_rule']}; {info['input']['normalisation']}",
        "opset": str(OPSET),
    }
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    model.producer_name = "hpseg"
    model.doc_string = "hpseg segmenter: " + entries["input_contract"]


# ---------------------------------------------------------------------------------------- position embedding

#: PyTorch's coefficient of the (non-antialiased) bicubic kernel, as DINO's interpolation uses it.
CUBIC_A = -0.75


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """The four bicubic weights of the taps at offsets -1, 0, 1, 2 from floor(x); t = x - floor(x)."""
    a = CUBIC_A

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(length: int, native: int, inverse_scale: torch.Tensor) -> torch.Tensor:
    """(length, native) matrix of ``F.interpolate(mode="bicubic", scale_factor=s)`` along one axis
    (``align_corners=False``, taps clamped to the edge), for ``inverse_scale`` = 1 / s, a 0-d
    tensor: output index i samples the input at (i + 0.5) / s - 0.5, PyTorch's rule when a scale
    factor is given. ``length`` may be symbolic (torch.export): only tensor ops depend on it."""
    position = (torch.arange(length, dtype=torch.float32) + 0.5) * inverse_scale - 0.5
    start = torch.floor(position)
    taps = torch.arange(native)
    matrix = torch.zeros((), dtype=torch.float32)
    for offset, weight in zip((-1, 0, 1, 2), _cubic_weights(position - start)):
        index = (start + offset).clamp(0, native - 1).to(torch.int64)
        matrix = matrix + (index[:, None] == taps[None, :]).to(torch.float32) * weight[:, None]
    return matrix


def exportable_dino_position_embedding(pos_embed: torch.Tensor, grid: tuple[Any, Any]) -> torch.Tensor:
    """:func:`hpseg.backbones.vit.dino_position_embedding` as tensor operations of the grid size.

    ``F.interpolate(scale_factor=...)`` does not export with a dynamic grid (the ONNX lowering
    takes the scale as a constant, or ignores it given an output size), so the bicubic resampling
    with DINO's scale ``(grid + 0.1) / native`` is written as two interpolation matrices. The
    native square grid gets scale 1, whose bicubic matrix is the identity: DINO's "returned
    untouched" without a branch on the (symbolic) grid. (1, 1 + N, C) -> (1, 1 + h*w, C).
    """
    n = pos_embed.shape[1] - 1
    side = int(math.isqrt(n))
    h, w = grid
    rows, cols = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    count_h, count_w = rows[-1] + 1, cols[-1] + 1  # h and w as tensors (export keeps them symbolic)
    native = (count_h == side) & (count_w == side)
    one = torch.ones((), dtype=torch.float32)
    inverse_h = torch.where(native, one, side / (count_h + 0.1))
    inverse_w = torch.where(native, one, side / (count_w + 0.1))
    dim = pos_embed.shape[-1]
    patch = pos_embed[0, 1:].reshape(side, side, dim).float()
    resampled = torch.einsum("ia,abc,jb->ijc", bicubic_matrix(h, side, inverse_h), patch,
                             bicubic_matrix(w, side, inverse_w))
    return torch.cat([pos_embed[:, :1], resampled.reshape(1, h * w, dim).to(pos_embed.dtype)], dim=1)


def _exportable_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's ``_dino_pos_embed`` with :func:`exportable_dino_position_embedding`."""
    batch, h, w, dim = x.shape
    tokens = torch.cat([model.cls_token.expand(batch, -1, -1), x.reshape(batch, h * w, dim)], dim=1)
    return model.pos_drop(tokens + exportable_dino_position_embedding(model.pos_embed, (h, w)))


@contextmanager
def exportable_positions(backbone: Backbone) -> Iterator[None]:
    """While exporting, a DINO-style backbone adds its positions with the exportable formulation
    (the same numbers to float rounding, tested); other backbones (timm's own resampling) as they are."""
    model = backbone.model
    hook = model.__dict__.get("_pos_embed")
    if not (isinstance(hook, partial) and hook.func is vit_backbone._dino_pos_embed):
        yield
        return
    model._pos_embed = partial(_exportable_tokens, model)
    try:
        yield
    finally:
        model._pos_embed = hook
