"""Segmentation metrics: confusion matrices, Hungarian matching, pixel accuracy and mIoU.

Implements the evaluation protocol of the spec (§8):

* *Unsupervised* (cluster) metrics: the confusion matrix between predicted cluster ids and
  ground-truth classes is accumulated over all valid pixels (``0 <= label < n_classes``);
  clusters are then matched one-to-one to classes with the Hungarian algorithm so that the
  number of matched pixels is maximal; accuracy and mIoU are computed on the matched matrix.
* *Linear* metrics: the same without matching (``matching="identity"``), since the probe
  predicts class ids directly.

Orientation convention used throughout this module (and by :mod:`hpseg.visualize`):
**rows are predictions, columns are ground-truth classes**, i.e. ``confusion[p, c]`` counts the
pixels predicted as ``p`` whose label is ``c``.

Scores are fractions in ``[0, 1]`` (the reference implementation reports them x100).
mIoU is the mean over classes of ``TP / (TP + FP + FN)``, leaving out classes that were
neither present in the labels nor predicted (their IoU is 0/0).

Typical use::

    metrics = SegmentationMetrics(n_classes=27)          # cluster metrics (Hungarian)
    for image, label in loader:
        metrics.update(model(image).argmax(1), label)     # (B, H, W) ids, label -1 = ignore
    metrics.all_reduce_()                                  # DDP: sum confusions over ranks
    result = metrics.compute()                             # accuracy, miou, iou, ...
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "SegmentationMetrics",
    "apply_assignment",
    "confusion_matrix",
    "hungarian_match",
    "majority_match",
    "segmentation_scores",
]


def confusion_matrix(pred: Tensor, label: Tensor, n_pred: int, n_classes: int) -> Tensor:
    """Count (prediction, class) pairs over the valid pixels.

    Args:
        pred: integer predictions (cluster or class ids in ``[0, n_pred)``), any shape.
        label: integer ground truth of the same shape; pixels with a label outside
            ``[0, n_classes)`` (e.g. -1 or 255) are ignored.
        n_pred: number of prediction ids (clusters).
        n_classes: number of ground-truth classes.

    Returns:
        ``(n_pred, n_classes)`` int64 tensor on ``pred``'s device; ``[p, c]`` counts pixels
        predicted ``p`` with label ``c``.

    Raises:
        ValueError: shapes differ, or a valid pixel has a prediction outside ``[0, n_pred)``
            (silently dropping such pixels would inflate the scores).
        TypeError: ``pred`` is floating point (logits passed instead of ids).
    """
    pred = torch.as_tensor(pred)
    label = torch.as_tensor(label, device=pred.device)
    if pred.shape != label.shape:
        raise ValueError(f"pred and label shapes differ: {tuple(pred.shape)} vs {tuple(label.shape)}")
    if pred.is_floating_point() or pred.is_complex():
        raise TypeError(f"pred must hold integer ids (got {pred.dtype}); take argmax over logits first")
    if n_pred <= 0 or n_classes <= 0:
        raise ValueError(f"n_pred and n_classes must be positive, got {n_pred}, {n_classes}")
    # int64 before comparing: uint8 labels (255 = ignore) and int32 ids both work then.
    pred = pred.reshape(-1).long()
    label = label.reshape(-1).long()
    valid = (label >= 0) & (label < n_classes)
    pred = pred[valid]
    label = label[valid]
    if pred.numel() and bool(((pred < 0) | (pred >= n_pred)).any()):
        bad = pred[(pred < 0) | (pred >= n_pred)]
        raise ValueError(
            f"predictions must lie in [0, {n_pred}) on valid pixels; found values "
            f"{int(bad.min())}..{int(bad.max())}"
        )
    # One bincount over a flattened (pred, label) index: a single kernel, works on CUDA.
    counts = torch.bincount(pred * n_classes + label, minlength=n_pred * n_classes)
    return counts.reshape(n_pred, n_classes)


def _to_numpy(confusion: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(confusion, Tensor):
        return confusion.detach().cpu().numpy()
    return np.asarray(confusion)


def hungarian_match(confusion: Tensor | np.ndarray) -> np.ndarray:
    """One-to-one assignment of clusters to classes maximising the matched pixels.

    Args:
        confusion: ``(n_pred, n_classes)`` counts, rows = clusters, columns = classes.

    Returns:
        ``(n_pred,)`` int64 array: the class assigned to each cluster, or -1 for clusters left
        unmatched (only possible when ``n_pred > n_classes``). When ``n_pred < n_classes`` some
        classes receive no cluster.
    """
    conf = _to_numpy(confusion)
    if conf.ndim != 2:
        raise ValueError(f"confusion must be 2-D, got shape {conf.shape}")
    # float64 is exact for counts below 2**53, far above any dataset's pixel count.
    rows, cols = linear_sum_assignment(conf.astype(np.float64), maximize=True)
    assignment = np.full(conf.shape[0], -1, dtype=np.int64)
    assignment[rows] = cols
    return assignment


def majority_match(confusion: Tensor | np.ndarray) -> np.ndarray:
    """Many-to-one assignment for over-clustering: each cluster goes to its most frequent class.

    Args:
        confusion: ``(n_pred, n_classes)`` counts, rows = clusters, columns = classes.

    Returns:
        ``(n_pred,)`` int64 class per cluster (ties: the lowest class id); -1 for clusters
        that hold no valid pixel. Several clusters may share a class.
    """
    conf = _to_numpy(confusion)
    if conf.ndim != 2:
        raise ValueError(f"confusion must be 2-D, got shape {conf.shape}")
    return np.where(conf.sum(axis=1) > 0, conf.argmax(axis=1), -1).astype(np.int64)


def apply_assignment(pred: Tensor, assignment: np.ndarray | Tensor) -> Tensor:
    """Map cluster ids to class ids with an assignment from :func:`hungarian_match`.

    Args:
        pred: integer cluster ids in ``[0, n_pred)``, any shape.
        assignment: ``(n_pred,)`` class per cluster (-1 = unmatched).

    Returns:
        Class ids of ``pred``'s shape and device (int64); pixels of unmatched clusters get -1.
    """
    table = torch.as_tensor(np.asarray(assignment), dtype=torch.long, device=pred.device)
    return table[pred.long()]


def segmentation_scores(confusion: Tensor | np.ndarray) -> dict[str, Any]:
    """Pixel accuracy, per-class IoU and mIoU from a *matched* confusion matrix.

    Args:
        confusion: ``(R, n_classes)`` counts with ``R >= n_classes``; row ``i < n_classes``
            holds the pixels predicted as class ``i`` (after matching, if any), column ``c``
            the pixels labelled ``c``. Rows ``i >= n_classes`` hold predictions that map to no
            class (unmatched clusters): they are always wrong, i.e. they count as false
            negatives of their true class and in the accuracy's denominator.

    Returns:
        ``{"accuracy": float, "miou": float, "iou": list[float | None]}``; ``iou[c]`` is None
        for a class neither labelled nor predicted, and such classes are left out of the mean.
        Accuracy and mIoU are ``nan`` when there is nothing to score.
    """
    conf = _to_numpy(confusion).astype(np.float64)
    if conf.ndim != 2 or conf.shape[0] < conf.shape[1]:
        raise ValueError(f"confusion must be (R, n_classes) with R >= n_classes, got {conf.shape}")
    n_classes = conf.shape[1]
    tp = np.diag(conf[:n_classes])
    labelled = conf.sum(axis=0)  # TP + FN per class
    predicted = conf[:n_classes].sum(axis=1)  # TP + FP per class
    union = labelled + predicted - tp
    iou: list[float | None] = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    seen = [v for v in iou if v is not None]
    total = conf.sum()
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "miou": float(np.mean(seen)) if seen else float("nan"),
        "iou": iou,
    }


class SegmentationMetrics:
    """Accumulates a confusion matrix over batches and scores it (spec §8).

    Args:
        n_classes: number of ground-truth classes; labels outside ``[0, n_classes)`` are ignored.
        n_pred: number of predicted ids (clusters); defaults to ``n_classes``.
        matching: how predicted ids map to classes: ``"hungarian"`` (one-to-one, the cluster
            metrics), ``"majority"`` (many-to-one, for over-clustering) or ``"identity"`` (the
            linear probe's class ids; ids ``>= n_classes`` then count as wrong).

    The confusion lives on the device of the first :meth:`update`, so accumulation stays on the
    GPU; only :meth:`compute` copies the small matrix to the host.
    """

    def __init__(self, n_classes: int, n_pred: int | None = None, matching: str = "hungarian") -> None:
        if n_classes <= 0:
            raise ValueError(f"n_classes must be positive, got {n_classes}")
        self.n_classes = int(n_classes)
        self.n_pred = int(n_pred) if n_pred is not None else self.n_classes
        if self.n_pred <= 0:
            raise ValueError(f"n_pred must be positive, got {self.n_pred}")
        if matching not in ("hungarian", "majority", "identity"):
            raise ValueError(f"matching must be 'hungarian', 'majority' or 'identity', got {matching!r}")
        self.matching = matching
        self.confusion: Tensor = torch.zeros(self.n_pred, self.n_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Clear the accumulated counts (keeps the device)."""
        self.confusion = torch.zeros_like(self.confusion)

    @torch.no_grad()
    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add a batch.

        Args:
            pred: integer ids in ``[0, n_pred)``, any shape (e.g. ``(B, H, W)``).
            label: same shape; -1, 255 or any value outside ``[0, n_classes)`` is ignored.
        """
        pred = torch.as_tensor(pred)
        conf = confusion_matrix(pred, label, self.n_pred, self.n_classes)
        if self.confusion.device != conf.device:
            self.confusion = self.confusion.to(conf.device)
        self.confusion += conf

    def all_reduce_(self) -> SegmentationMetrics:
        """Sum the confusion over all ranks of the default process group (in place).

        A no-op when ``torch.distributed`` is not initialised. Call it exactly once on every
        rank before :meth:`compute`; calling it twice would count the data again.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        buf = self.confusion
        # NCCL only reduces CUDA tensors; metrics that never saw an update are still on the CPU.
        if dist.get_backend() == "nccl" and buf.device.type != "cuda":
            buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.confusion = buf.to(self.confusion.device)
        return self

    def assignment(self) -> np.ndarray:
        """``(n_pred,)`` class of each predicted id: Hungarian, majority or identity (-1 = none)."""
        if self.matching == "majority":
            return majority_match(self.confusion)
        if self.matching == "hungarian":
            return hungarian_match(self.confusion)
        ids = np.arange(self.n_pred, dtype=np.int64)
        return np.where(ids < self.n_classes, ids, -1)

    def compute(self) -> dict[str, Any]:
        """Score the accumulated counts.

        Returns:
            dict with ``accuracy`` and ``miou`` (floats in [0, 1], nan if no valid pixel),
            ``iou`` (list per class, None = never labelled nor predicted), ``confusion``
            (``(n_classes, n_classes)`` int64 numpy, rows = matched predicted class, columns =
            true class), ``unmatched`` (``(n_classes,)`` pixels per true class predicted by
            clusters mapped to no class), ``assignment`` (``(n_pred,)`` class per cluster,
            -1 = unmatched) and ``n_pixels`` (valid pixels counted).
        """
        raw = self.confusion.detach().cpu().numpy()
        assignment = self.assignment()
        matched = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        mapped = assignment >= 0
        # Clusters mapped to one class add up (majority matching maps many to one).
        np.add.at(matched, assignment[mapped], raw[mapped])
        unmatched = raw[~mapped].sum(axis=0).astype(np.int64)
        scores = segmentation_scores(np.vstack([matched, unmatched[None, :]]))
        scores.update(
            confusion=matched,
            unmatched=unmatched,
            assignment=assignment,
            n_pixels=int(raw.sum()),
        )
        return scores

    def state_dict(self) -> dict[str, Any]:
        """Picklable state (confusion on the CPU) for checkpoints or gathering."""
        return {
            "n_classes": self.n_classes,
            "n_pred": self.n_pred,
            "matching": self.matching,
            "confusion": self.confusion.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; sizes must match this instance."""
        conf = torch.as_tensor(state["confusion"], dtype=torch.int64)
        if tuple(conf.shape) != (self.n_pred, self.n_classes):
            raise ValueError(
                f"state confusion has shape {tuple(conf.shape)}, expected {(self.n_pred, self.n_classes)}"
            )
        self.matching = state["matching"]
        self.confusion = conf.to(self.confusion.device).clone()

    def __repr__(self) -> str:
        return (
            f"SegmentationMetrics(n_classes={self.n_classes}, n_pred={self.n_pred}, "
            f"matching={self.matching!r}, n_pixels={int(self.confusion.sum())})"
        )
