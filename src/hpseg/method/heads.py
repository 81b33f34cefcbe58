"""Trainable heads of HP: the segmentation head S and the projection head P (spec §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationHead(nn.Module):
    """``s = Conv1x1(drop(f)) + Conv1x1(ReLU(Conv1x1(drop(f))))``.

    A linear branch plus a two-layer nonlinear branch of hidden width C; each branch draws its
    own channel-dropout mask (Dropout2d), active in training mode only.

    Shapes: f (B, C, h, w) -> s (B, D, h, w).
    """

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.dim = dim
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, kernel_size=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features)) + self.nonlinear(self.dropout(features))


class ProjectionHead(nn.Module):
    """``z = norm(Linear(D, D)(s))`` per patch; the contrastive losses act on z.

    Shapes: s (..., D) -> z (..., D), unit L2 norm along the last axis.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, segmentation_rows: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(segmentation_rows).float(), dim=-1)


def to_rows(maps: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) feature maps -> (B*h*w, D) rows, patches row-major inside each image."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
