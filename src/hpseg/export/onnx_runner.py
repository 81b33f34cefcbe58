"""Run an exported hpseg ONNX model with onnxruntime, numpy and Pillow only -- no PyTorch.

    from hpseg.export.onnx_runner import OnnxSegmenter   # or, this file copied beside a script:
    from onnx_runner import OnnxSegmenter                # (hpseg itself not installed)
    model = OnnxSegmenter("model.onnx")
    labels = model.segment(Image.open("photo.jpg"))        # (H, W) int64, as `hpseg predict`

The geometry is ``hpseg predict``'s (see :mod:`hpseg.inference.tiling`): resize the shorter side to
``size`` (bilinear, antialiased, rounded to uint8), pad bottom/right by repeating edge pixels to
whole patches, slide square windows with a stride of about two thirds of a window, average the
patch logits where windows overlap, resample them bilinearly to the input's own resolution and
take the argmax (then the cluster->class mapping stored in the model, if any). The defaults for
``size`` and ``window`` come from the model's metadata.

This file imports nothing from hpseg or torch, so it can be copied beside a script and used
where only ``numpy``, ``Pillow`` and ``onnxruntime`` are installed (README's example is tested
that way). Every ONNX file is read through :func:`read_metadata`, which checks the model's
``hpseg`` metadata (types and ranges) and names the file in every message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["OnnxModelError", "OnnxRuntimeMissingError", "OnnxSegmenter", "OnnxTiling", "read_metadata"]


class OnnxRuntimeMissingError(ImportError):
    """onnxruntime is not installed; the message names the pip command.

    Defined here rather than taken from :mod:`hpseg.export` so that this file imports nothing from
    hpseg (so it is no :class:`hpseg.errors.HpsegError`); ``hpseg predict --onnx`` turns it, and
    the ``ValueError`` about an unloadable model, into a ``UsageError`` printed in one line.
    """


class OnnxModelError(ValueError):
    """An ONNX file that is not a model of ``hpseg export --format onnx`` or whose ``hpseg``
    metadata is malformed; the message names the file and what is wrong."""


#: The graph's input and the outputs the runner reads.
INPUT, OUTPUTS = "image", ("cluster_logits", "linear_logits")


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(name, str) for name in value)


def _metadata_problems(info: dict[str, Any]) -> list[str]:
    """What is missing or mistyped in the ``hpseg`` metadata ``info`` (empty when all is well)."""
    problems = []
    tiling = info.get("tiling")
    if not isinstance(tiling, dict):
        problems.append("no 'tiling' mapping (size, window, patch)")
    else:
        problems += [f"'tiling.{key}' is {tiling.get(key)!r}, expected an integer >= {low}"
                     for key, low in (("patch", 1), ("size", 0), ("window", 0)) if not _is_int(tiling.get(key), low)]
    if not _is_int(info.get("n_clusters"), 1):
        problems.append(f"'n_clusters' is {info.get('n_clusters')!r}, expected an integer >= 1")
    if not _is_names(info.get("class_names")):
        problems.append("'class_names' is not a list of names")
    labels = info.get("label_names")
    if not isinstance(labels, dict) or not all(_is_names(labels.get(head)) for head in ("cluster", "linear")):
        problems.append("'label_names' is not a mapping of 'cluster' and 'linear' to lists of names")
    mapping, n_clusters, classes = info.get("cluster_to_class"), info.get("n_clusters"), info.get("class_names")
    if mapping is not None and not (isinstance(mapping, list) and len(mapping) == n_clusters and isinstance(classes, list)
                                    and all(isinstance(c, int) and -1 <= c < len(classes) for c in mapping)):
        problems.append("'cluster_to_class' is not a list of one class id (or -1) per cluster")
    if not isinstance(info.get("mapping_source"), (str, type(None))):
        problems.append("'mapping_source' is not a text")
    return problems


def read_metadata(path: str | Path, text: str | None) -> dict[str, Any]:
    """The ``hpseg`` metadata of the ONNX file ``path`` (``text``: its JSON, None when absent),
    checked field by field; :class:`OnnxModelError` naming the file and the field otherwise."""
    if text is None:
        raise OnnxModelError(f"{path} has no 'hpseg' metadata: not exported by `hpseg export --format onnx`")
    try:
        info = json.loads(text)
    except ValueError as error:
        raise OnnxModelError(f"{path}: its 'hpseg' metadata is not valid JSON ({error})") from None
    if not isinstance(info, dict):
        raise OnnxModelError(f"{path}: its 'hpseg' metadata is not a JSON object")
    problems = _metadata_problems(info)
    if problems:
        raise OnnxModelError(f"{path}: its 'hpseg' metadata is damaged: {'; '.join(problems)} (written by an "
                             "edited or foreign exporter? export the checkpoint again)")
    return info


@dataclass(frozen=True)
class OnnxTiling:
    """``hpseg.inference.tiling.Tiling`` without torch: shorter side ``size`` (0 = keep), square windows
    of ``window`` pixels (0 = whole image), backbone patch ``patch``."""

    size: int
    window: int
    patch: int

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(H', W') after resizing the shorter side to ``size`` (torchvision's rounding)."""
        if self.size <= 0:
            return height, width
        if height <= width:
            return self.size, max(1, int(self.size * width / height))
        return max(1, int(self.size * height / width)), self.size

    def padded(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch
        return int(math.ceil(height / p) * p), int(math.ceil(width / p) * p)

    def windows(self, height: int, width: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """For a padded (H, W): the window shape and the (top, left) offsets."""
        wh = height if self.window == 0 else min(self.window, height)
        ww = width if self.window == 0 else min(self.window, width)
        tops, lefts = _starts(height, wh, self._stride(wh)), _starts(width, ww, self._stride(ww))
        return (wh, ww), [(top, left) for top in tops for left in lefts]

    def _stride(self, window: int) -> int:
        return max(self.patch, (2 * window // 3) // self.patch * self.patch)


def _starts(length: int, window: int, stride: int) -> list[int]:
    if window >= length:
        return [0]
    return [*range(0, length - window, stride), length - window]


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (H', W', 3) uint8, bilinear with antialiasing when shrinking.

    Pillow's float ("F") resampling is the filter torch's ``interpolate(antialias=True)`` copies;
    working in float and rounding once gives hpseg's uint8 values (up to ties).
    """
    height, width = size
    channels = [np.asarray(Image.fromarray(rgb[:, :, c].astype(np.float32), "F")
                           .resize((width, height), Image.Resampling.BILINEAR)) for c in range(3)]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def _source(n_out: int, n_in: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source indices and weights, align_corners=False (as hpseg.inference.tiling)."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, np.clip(src - i0, 0.0, 1.0).astype(np.float32)


def resample_argmax(scores: np.ndarray, size: tuple[int, int], scale: tuple[float, float],
                    max_elements: int = 1 << 24) -> np.ndarray:
    """(K, h, w) scores -> (H, W) int64 argmax of their bilinear resampling, in bands of rows;
    the output pixel centre ``y + 0.5`` reads the input at ``(y + 0.5) * scale - 0.5``."""
    k, h, w = scores.shape
    height, width = size
    y0, y1, ly = _source(height, h, scale[0])
    x0, x1, lx = _source(width, w, scale[1])
    out = np.empty((height, width), dtype=np.int64)
    rows = max(1, max_elements // max(1, k * width))
    for start in range(0, height, rows):
        band = slice(start, min(height, start + rows))
        top, bottom = scores[:, y0[band]], scores[:, y1[band]]
        mixed = top + (bottom - top) * ly[band][None, :, None]
        left, right = mixed[:, :, x0], mixed[:, :, x1]
        out[band] = (left + (right - left) * lx[None, None, :]).argmax(0)
    return out


def to_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or an (H, W, 3) / (H, W) uint8 array -> (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB") if image.mode != "RGB" else image
        return np.asarray(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"expected a PIL image or an (H, W, 3) uint8 array, got {array.dtype} {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"empty image of shape {array.shape}")
    return array[:, :, :3]


class OnnxSegmenter:
    """An exported hpseg model, with the same ``segment`` / ``label_names`` interface as
    :class:`hpseg.inference.segmenter.Segmenter` (so ``hpseg predict --onnx`` runs through the same code).

    Attributes: ``info`` (the model's metadata), ``class_names``, ``cluster_to_class``,
    ``n_clusters``, ``mapping_source``, ``tiling``, ``batch_size``, ``checkpoint`` (the .onnx path).
    """

    def __init__(self, path: str | Path, *, size: int | None = None, window: int | None = None,
                 batch_size: int = 8, threads: int = 0, use_mapping: bool = True) -> None:
        try:
            import onnxruntime  # lazy: an optional extra
        except ImportError as error:
            raise OnnxRuntimeMissingError(f"onnxruntime is not installed ({error}); install it with: "
                                          'pip install "hpseg[onnx]" (or pip install onnxruntime)') from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise OnnxModelError(f"{path} is not a loadable ONNX model: {error}") from None
        self.info: dict[str, Any] = read_metadata(path, self.session.get_modelmeta().custom_metadata_map.get("hpseg"))
        inputs = [node.name for node in self.session.get_inputs()]
        outputs = {node.name for node in self.session.get_outputs()}
        if inputs != [INPUT] or not outputs.issuperset(OUTPUTS):
            raise OnnxModelError(f"{path}: the graph's input is {inputs} and its outputs {sorted(outputs)}; an hpseg "
                                 f"model has the input {INPUT!r} and the outputs {', '.join(OUTPUTS)}")
        tiling = self.info["tiling"]
        p = int(tiling["patch"])
        size = int(tiling["size"] if size is None else size)
        window = size if window is None else window
        window = int(math.ceil(window / p) * p) if window > 0 else 0
        self.tiling = OnnxTiling(size, window, p)
        self.class_names = list(self.info["class_names"])
        self.n_clusters = int(self.info["n_clusters"])
        # use_mapping=False (predict --no-mapping): raw cluster ids even when a mapping is stored.
        self.cluster_to_class = self.info["cluster_to_class"] if use_mapping else None
        self.mapping_source = self.info.get("mapping_source") if self.cluster_to_class is not None else None
        self.checkpoint = str(path)
        self.batch_size = batch_size
        self.crf = False  # the dense CRF is not part of the graph

    def label_names(self, head: str = "cluster") -> list[str]:
        """Names of the ids :meth:`segment` returns for ``head``."""
        _check_head(head)
        if head == "cluster" and self.cluster_to_class is None:
            return [f"cluster {k}" for k in range(self.n_clusters)]
        return list(self.info["label_names"][head])

    def scores(self, image: Any, head: str = "cluster") -> tuple[np.ndarray, dict[str, Any]]:
        """Per-patch logits averaged over the windows: ((K, h, w) float32, geometry)."""
        _check_head(head)
        rgb = to_rgb_array(image)
        size = (int(rgb.shape[0]), int(rgb.shape[1]))
        resized_size = self.tiling.resized(*size)
        resized = _resize(rgb, resized_size) if resized_size != size else rgb
        padded_h, padded_w = self.tiling.padded(*resized_size)
        padded = np.pad(resized, ((0, padded_h - resized_size[0]), (0, padded_w - resized_size[1]), (0, 0)),
                        mode="edge")
        chw = np.ascontiguousarray(padded.transpose(2, 0, 1))
        grid = self._tile_and_average(chw, f"{head}_logits")
        return grid, {"size": size, "resized_size": resized_size, "resized": resized}

    def _tile_and_average(self, image: np.ndarray, output: str) -> np.ndarray:
        """(3, H, W) uint8 padded image -> (X, H/p, W/p) mean of the windows' patch logits."""
        p = self.tiling.patch
        height, width = image.shape[1:]
        (wh, ww), offsets = self.tiling.windows(height, width)
        total: np.ndarray | None = None
        count = np.zeros((1, height // p, width // p), np.float32)
        for i in range(0, len(offsets), max(1, self.batch_size)):
            chunk = offsets[i:i + self.batch_size]
            windows = np.stack([image[:, top:top + wh, left:left + ww] for top, left in chunk])
            (values,) = self.session.run([output], {"image": windows})
            if total is None:
                total = np.zeros((values.shape[1], height // p, width // p), np.float32)
            for (top, left), value in zip(chunk, values):
                rows, cols = slice(top // p, (top + wh) // p), slice(left // p, (left + ww) // p)
                total[:, rows, cols] += value
                count[:, rows, cols] += 1
        assert total is not None
        return total / count

    def segment(self, image: Any, head: str = "cluster", *, crf: bool = False) -> np.ndarray:
        """(H, W) int64 label map at the image's own resolution (class ids with a mapping or the
        linear head, cluster ids otherwise; -1 = cluster matched to no class)."""
        if crf:
            raise ValueError("the dense CRF is not part of the ONNX model; use the PyTorch checkpoint for --crf")
        grid, geometry = self.scores(image, head)
        (height, width), (rh, rw) = geometry["size"], geometry["resized_size"]
        p = self.tiling.patch
        labels = resample_argmax(grid, (height, width), (rh / (height * p), rw / (width * p)))
        if head == "cluster" and self.cluster_to_class is not None:
            labels = np.asarray(self.cluster_to_class, dtype=np.int64)[labels]
        return labels

    def segment_many(self, images: Iterable[Any], head: str = "cluster", *,
                     crf: bool = False) -> Iterator[np.ndarray]:
        """:meth:`segment` of each image, in order (the interface of ``Segmenter.segment_many``;
        here each image's windows still run on their own)."""
        for image in images:
            yield self.segment(image, head, crf=crf)


def _check_head(head: str) -> None:
    if head not in ("cluster", "linear"):
        raise ValueError(f"head must be 'cluster' or 'linear', got {head!r}")
