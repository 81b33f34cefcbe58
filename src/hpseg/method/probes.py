"""Evaluation probes, trained online on detached segmentation features (spec §1).

They never change the segmentation head: callers pass ``s.detach()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClusterProbe(nn.Module):
    """K learnable centroids; a patch belongs to the centroid of highest cosine similarity.

    Trained by minimising ``-mean(sum_k onehot_k * cos(s, c_k))``.
    """

    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        self.n_clusters = n_clusters
        self.centroids = nn.Parameter(torch.randn(n_clusters, dim))

    def cosine(self, segmentation: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, K, h, w) cosine similarity to every centroid."""
        return torch.einsum(
            "bdhw,kd->bkhw", F.normalize(segmentation.float(), dim=1), F.normalize(self.centroids.float(), dim=1)
        )

    def loss(self, segmentation: torch.Tensor) -> torch.Tensor:
        cosine = self.cosine(segmentation)
        assigned = F.one_hot(cosine.argmax(1), self.n_clusters).permute(0, 3, 1, 2).to(cosine.dtype)
        return -(cosine * assigned).sum(1).mean()

    def predict(self, segmentation: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w) cluster ids."""
        return self.cosine(segmentation).argmax(1)


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
