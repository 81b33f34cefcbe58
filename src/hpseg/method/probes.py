"""Evaluation probes, trained online on detached segmentation features (spec §1).

They never change the segmentation head: callers pass ``s.detach()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def centroid_scores(features: torch.Tensor, centroids: torch.Tensor, *, cosine: bool = True) -> torch.Tensor:
    """(B, D, h, w) features and (K, D) centroids -> (B, K, h, w) scores of every centroid.

    ``cosine=True``: cosine similarities ``<f/||f||, c_k/||c_k||>`` (the probe's loss, the CRF's
    unaries). ``cosine=False``: ``<f, c_k/||c_k||>``, whose argmax over k is the same (``||f||``
    does not depend on k) and which is linear in f, so it can be upsampled before the argmax
    (label maps at full resolution, see :mod:`hpseg.inference.label_maps`). Computed in float32.
    """
    features = F.normalize(features.float(), dim=1) if cosine else features.float()
    return torch.einsum("bdhw,kd->bkhw", features, F.normalize(centroids.float(), dim=1))


class ClusterProbe(nn.Module):
    """K learnable centroids; a patch belongs to the centroid of highest cosine similarity.

    Trained by minimising ``-mean(sum_k onehot_k * cos(s, c_k))``.
    """

    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        self.n_clusters = n_clusters
        self.centroids = nn.Parameter(torch.randn(n_clusters, dim))

    def loss(self, segmentation: torch.Tensor) -> torch.Tensor:
        cosine = centroid_scores(segmentation, self.centroids)
        assigned = F.one_hot(cosine.argmax(1), self.n_clusters).permute(0, 3, 1, 2).to(cosine.dtype)
        return -(cosine * assigned).sum(1).mean()


class LinearProbe(nn.Module):
    """Conv1x1(D -> n_classes), trained by cross-entropy on the training crops' labels."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.classifier = nn.Conv2d(dim, n_classes, kernel_size=1)

    def forward(self, segmentation: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, n_classes, h, w) logits."""
        return self.classifier(segmentation)

    def loss(self, segmentation: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits upsampled bilinearly to the labels' (B, H, W); -1 = ignore.

        Returns 0 (with a graph) when no pixel is labelled, so unlabelled data trains nothing.
        """
        logits = F.interpolate(self(segmentation), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        valid = (labels >= 0) & (labels < self.n_classes)
        if not bool(valid.any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float().permute(0, 2, 3, 1)[valid], labels[valid])
