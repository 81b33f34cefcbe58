"""Evaluation (spec §8): unsupervised (Hungarian-matched cluster probe) and linear metrics,
per-class IoU, confusion-matrix images, CRF on/off, and the k-means "DINO baseline".

Results always say which checkpoint (and its selection rule), seed, config and CRF setting
produced them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from hpseg.backbones import Backbone
from hpseg.inference import kmeans_label_maps, label_maps
from hpseg.method.model import HiddenPositivesModel
from hpseg.metrics import SegmentationMetrics
from hpseg.runtime import DistributedContext, autocast

METRIC_KEYS = ("unsupervised_accuracy", "unsupervised_miou", "linear_accuracy", "linear_miou")


def validation_loader(dataset: Dataset, batch_size: int, num_workers: int, context: DistributedContext,
                      max_images: int = 0) -> DataLoader:
    """Sequential loader over (this rank's share of) the validation set."""
    n = len(dataset)  # type: ignore[arg-type]
    if max_images > 0:
        n = min(n, max_images)
    indices = list(range(context.rank, n, context.world_size))
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers, shuffle=False)


def _summarise(cluster: SegmentationMetrics | None, linear: SegmentationMetrics | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for prefix, metrics in (("unsupervised", cluster), ("linear", linear)):
        if metrics is None:
            continue
        metrics.all_reduce_()
        result = metrics.compute()
        out[f"{prefix}_accuracy"] = result["accuracy"]
        out[f"{prefix}_miou"] = result["miou"]
        out[f"{prefix}_iou"] = result["iou"]
        out[f"{prefix}_confusion"] = result["confusion"].tolist()
        if prefix == "unsupervised":
            out["cluster_to_class"] = result["assignment"].tolist()
        out["n_pixels"] = result["n_pixels"]
    return out


@torch.no_grad()
def evaluate_model(
    model: HiddenPositivesModel,
    backbone: Backbone,
    batches: Iterable[dict[str, torch.Tensor]],
    n_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    crf: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Cluster (Hungarian) and linear accuracy / mIoU of ``model`` on validation batches.

    ``batches`` yield dicts from :class:`hpseg.data.ValCrops`: image (B, 3, S, S), rgb uint8,
    label (B, S, S). Returns fractions in [0, 1] under the keys of ``METRIC_KEYS`` plus per-class
    IoU lists and matched confusion matrices.
    """
    was_training = model.training
    model.eval()
    cluster = SegmentationMetrics(n_classes, hungarian=True)
    linear = SegmentationMetrics(n_classes, hungarian=False)
    for batch in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        labels = batch["label"].to(device)
        with autocast(device, amp_dtype):
            features = backbone(batch["image"].to(device)).features
        maps = label_maps(model, features.float(), tuple(labels.shape[-2:]), batch["rgb"] if crf else None)
        cluster.update(maps.clusters.to(device), labels)
        linear.update(maps.classes.to(device), labels)
    model.train(was_training)
    return _summarise(cluster, linear)


def selection_score(results: dict[str, Any]) -> float:
    """[ref quirk] The reference keeps the checkpoint with the best sum of the four metrics."""
    return float(sum(results[key] for key in METRIC_KEYS))


def write_json_atomic(payload: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        json.dump(payload, stream, indent=2)
    os.replace(temporary, path)
    return path


__all__ = ["METRIC_KEYS", "evaluate_model", "kmeans_label_maps", "selection_score", "validation_loader",
           "write_json_atomic"]
