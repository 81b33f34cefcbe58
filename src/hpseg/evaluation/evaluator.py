"""The evaluator of the evaluation loop (spec §8): label maps in, typed scores out.

:class:`SegmentationEvaluator` has detectron2's evaluator shape (``reset`` / ``process`` /
``evaluate``): it accumulates the cluster head's confusion (scored after Hungarian matching, and
after many-to-one majority matching when there are more clusters than classes) and the linear
probe's (scored as is), sums them over ``torchrun`` ranks and returns :class:`EvaluationResults`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hpseg.evaluation.metrics import SegmentationMetrics
from hpseg.inference.label_maps import LabelMaps

__all__ = ["METRIC_KEYS", "EvaluationResults", "HeadScores", "SegmentationEvaluator"]

#: The four headline numbers, as named in results.json and metrics.jsonl.
METRIC_KEYS = ("unsupervised_accuracy", "unsupervised_miou", "linear_accuracy", "linear_miou")


@dataclass(frozen=True)
class HeadScores:
    """One head's scores (fractions in [0, 1]).

    Attributes:
        accuracy, miou: pixel accuracy and mean IoU.
        iou: per class (None: a class neither labelled nor predicted).
        confusion: (C, C) matched confusion, rows = predicted class, columns = true class.
        assignment: class of each predicted id (-1: none).
    """

    accuracy: float
    miou: float
    iou: list[float | None]
    confusion: list[list[int]]
    assignment: list[int]

    @classmethod
    def of(cls, metrics: SegmentationMetrics) -> HeadScores:
        result = metrics.compute()
        return cls(result["accuracy"], result["miou"], result["iou"], result["confusion"].tolist(),
                   result["assignment"].tolist())


@dataclass(frozen=True)
class EvaluationResults:
    """What an evaluation measured.

    Attributes:
        unsupervised: the cluster head, Hungarian-matched (one cluster per class).
        linear: the linear probe, None without one (the baseline on unlabelled training crops).
        majority: the cluster head matched many-to-one, only when there are more clusters than classes.
        n_clusters: the cluster head's K.
        n_pixels: labelled pixels scored.
    """

    unsupervised: HeadScores
    linear: HeadScores | None
    majority: HeadScores | None
    n_clusters: int
    n_pixels: int

    @property
    def cluster_to_class(self) -> list[int]:
        """The class each cluster was matched to (Hungarian; -1: none)."""
        return self.unsupervised.assignment

    def metrics(self) -> dict[str, float]:
        """The headline numbers under :data:`METRIC_KEYS` (the linear ones only with a probe)."""
        heads = {"unsupervised": self.unsupervised, "linear": self.linear}
        return {f"{name}_{score}": getattr(head, score) for name, head in heads.items() if head is not None
                for score in ("accuracy", "miou")}

    def to_dict(self) -> dict[str, Any]:
        """The flat form checkpoints keep as their ``metrics`` (its keys unchanged since format 1)."""
        out: dict[str, Any] = {}
        for name, head in (("unsupervised", self.unsupervised), ("linear", self.linear)):
            if head is not None:
                out.update({f"{name}_accuracy": head.accuracy, f"{name}_miou": head.miou, f"{name}_iou": head.iou,
                            f"{name}_confusion": head.confusion})
        out.update(cluster_to_class=self.cluster_to_class, n_clusters=self.n_clusters, matching="hungarian",
                   n_pixels=self.n_pixels)
        if self.majority is not None:
            out.update(unsupervised_majority_accuracy=self.majority.accuracy,
                       unsupervised_majority_miou=self.majority.miou,
                       cluster_to_class_majority=self.majority.assignment)
        return out


class SegmentationEvaluator:
    """Accumulates label maps against labels; :meth:`evaluate` scores them (summed over ranks)."""

    def __init__(self, n_classes: int, n_clusters: int, *, linear: bool = True) -> None:
        self.n_classes, self.n_clusters, self.linear = n_classes, n_clusters, linear
        self.reset()

    def reset(self) -> None:
        self.clusters = SegmentationMetrics(self.n_classes, n_pred=self.n_clusters)
        self.classes = SegmentationMetrics(self.n_classes, matching="identity") if self.linear else None

    def process(self, labels: torch.Tensor, maps: LabelMaps) -> None:
        """(B, H, W) labels (outside [0, n_classes): ignored) and the same images' label maps."""
        self.clusters.update(maps.clusters.to(labels.device), labels)
        if self.classes is not None:
            if maps.classes is None:
                raise ValueError("this evaluator scores a linear probe, but the predictor gave no linear label maps")
            self.classes.update(maps.classes.to(labels.device), labels)

    def evaluate(self) -> EvaluationResults:
        """Scores of everything processed on every rank (call once on every rank)."""
        self.clusters.all_reduce_()
        if self.classes is not None:
            self.classes.all_reduce_()
        return EvaluationResults(
            unsupervised=HeadScores.of(self.clusters),
            linear=None if self.classes is None else HeadScores.of(self.classes),
            majority=self._majority(), n_clusters=self.n_clusters, n_pixels=int(self.clusters.confusion.sum()))

    def _majority(self) -> HeadScores | None:
        """Over-clustering: the same K x C confusion scored by many-to-one majority matching."""
        if self.n_clusters <= self.n_classes:
            return None
        majority = SegmentationMetrics(self.n_classes, self.n_clusters, matching="majority")
        majority.confusion = self.clusters.confusion.clone()
        return HeadScores.of(majority)
