"""``hpseg export --format onnx``: the whole segmenter as one ONNX graph.

The graph holds the ImageNet normalisation, the frozen backbone (through ``Backbone.forward``,
so its position-embedding interpolation is the one exported), the segmentation head S and
both heads::

    image          (B, 3, H, W) uint8 RGB, 0..255; H and W multiples of the patch size p
    cluster_logits (B, K, H/p, W/p) float32  <s, c_k / ||c_k||>, as evaluation and predict score
    linear_logits  (B, n_classes, H/p, W/p) float32  the linear probe's logits
    cluster_labels (B, H, W) int64  argmax of cluster_logits upsampled bilinearly to (H, W),
                   mapped to class ids by the Hungarian cluster->class mapping when the export
                   had one (-1 = cluster matched to no class)
    linear_labels  (B, H, W) int64  argmax of linear_logits upsampled bilinearly to (H, W)

Batch, H and W are dynamic. The resize / tiling / averaging of ``hpseg predict`` happens outside
the graph (in :mod:`hpseg.export.runtime`, numpy only), from the patch logits; the label outputs
are the single-pass maps of an image already at the wanted size. The contract, the tiling
settings, class names, colours and the mapping are stored as JSON in the model's metadata
(key ``hpseg``). The dense CRF is not part of the graph.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpseg.export import missing_extra

#: Opset of the exported graphs: 18 is the first with Resize(antialias=1), which timm's
#: antialiased bicubic position-embedding resampling needs.
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

    def __init__(self, segmenter: Any) -> None:
        super().__init__()
        self.backbone = segmenter.backbone
        self.segmentation = segmenter.model.segmentation
        self.linear_probe = segmenter.model.linear_probe
        self.register_buffer("centroids", segmenter.model.cluster_probe.centroids.detach().float().clone())
        mapping = segmenter.cluster_to_class
        table = torch.arange(self.centroids.shape[0]) if mapping is None else torch.tensor(mapping)
        self.register_buffer("cluster_to_class", table.to(torch.int64))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from hpseg.data.transforms import normalize
        from hpseg.inference import centroid_scores

        features = self.backbone(normalize(image)).features
        segmentation = self.segmentation(features)
        cluster = centroid_scores(segmentation, self.centroids)
        linear = self.linear_probe(segmentation).float()
        size = (image.shape[-2], image.shape[-1])
        clusters = F.interpolate(cluster, size=size, mode="bilinear", align_corners=False).argmax(1)
        classes = F.interpolate(linear, size=size, mode="bilinear", align_corners=False).argmax(1)
        return cluster, linear, self.cluster_to_class[clusters], classes


def metadata(segmenter: Any, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """What a user of the .onnx file needs besides the graph (stored as JSON in its metadata)."""
    from hpseg import __version__
    from hpseg.backbones import IMAGENET_MEAN, IMAGENET_STD
    from hpseg.visualize import palette

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
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    rows = Dim("rows", min=1, max=MAX_SIDE // patch)
    cols = Dim("cols", min=1, max=MAX_SIDE // patch)
    example = torch.zeros((2, 3, 2 * patch, 3 * patch), dtype=torch.uint8)
    torch.onnx.export(
        graph, (example,), str(path), dynamo=True, opset_version=OPSET, input_names=["image"],
        output_names=list(OUTPUTS), dynamic_shapes={"image": {0: batch, 2: patch * rows, 3: patch * cols}},
        verbose=False, external_data=False,
    )


def export_onnx(segmenter: Any, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Write ``segmenter`` (an :class:`hpseg.api.Segmenter`, on the CPU) to ``out`` atomically.

    Returns the path written. Raises ImportError naming ``hpseg[onnx]`` without onnx.
    """
    try:
        import onnx  # lazy: an optional extra, and importing it costs time
    except ImportError as error:
        raise missing_extra("onnx", "onnx", error) from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = SegmenterGraph(segmenter).to("cpu").eval()
    info = metadata(segmenter, checkpoint)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        traced = Path(scratch) / "traced.onnx"
        with torch.no_grad():
            _trace(graph, traced, segmenter.tiling.patch)
        model = onnx.load(str(traced))
        _set_metadata(model, info)
        onnx.checker.check_model(model)
        final = Path(scratch) / "model.onnx"
        onnx.save(model, str(final))
        os.replace(final, out)
    return out


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
