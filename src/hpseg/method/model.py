"""The trainable part of HP in one module: heads S, S' (EMA), P and the two probes.

The frozen backbone lives outside (``hpseg.backbones``) so checkpoints stay small and the
same heads can sit on features read from the feature cache.
"""

from __future__ import annotations

import torch
from torch import nn

from hpseg.method.ema import ema_update_, make_ema_copy
from hpseg.method.heads import ProjectionHead, SegmentationHead
from hpseg.method.probes import ClusterProbe, LinearProbe


class HiddenPositivesModel(nn.Module):
    """Segmentation head S, its EMA copy S', projection head P, cluster and linear probes.

    Shapes: backbone features f (B, C, h, w) -> segmentation features s (B, D, h, w).
    """

    def __init__(self, feature_dim: int, dim: int, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.feature_dim, self.dim, self.n_classes = feature_dim, dim, n_classes
        self.segmentation = SegmentationHead(feature_dim, dim, dropout)
        self.ema_segmentation = make_ema_copy(self.segmentation)
        self.projection = ProjectionHead(dim)
        self.cluster_probe = ClusterProbe(dim, n_classes)
        self.linear_probe = LinearProbe(dim, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Segmentation features s of S (not S'), used for evaluation and prediction."""
        return self.segmentation(features)

    def update_ema(self, momentum: float) -> None:
        ema_update_(self.ema_segmentation, self.segmentation, momentum)
