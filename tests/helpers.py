"""Shared builders for tests: a synthetic dataset, a tiny, fast training config, clustered loss inputs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from hpseg.config import Config
from hpseg.data import build_raw_dataset, make_synthetic_dataset, prepare_five_crops


def tiny_overrides(data_root: Path, runs: Path, steps: int = 12) -> list[str]:
    return [
        "backbone.name=vit_tiny_p8", "backbone.pretrained=false",
        "data.dataset=folder", f"data.root={data_root}", "data.crop_size=32", "data.val_size=32",
        "data.num_workers=0",
        "method.dim=16", "method.n_classes=4", "method.pool_size=32", "method.warmup=3", "method.renew_interval=5",
        "train.batch_size=4", f"train.max_steps={steps}", "train.val_interval=6", "train.log_interval=1",
        "train.checkpoint_interval=4", f"train.output_dir={runs}", "train.val_max_images=4",
    ]


def synthetic_prepared(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    """A synthetic folder dataset with its five-crop training set prepared; returns the data root."""
    data = root / "data"
    if not (data / "hpseg_prepared" / "train_32" / "manifest.json").exists():
        make_synthetic_dataset(data, n_train=n_train, n_val=n_val, size=64, n_classes=4, seed=0)
        raw = build_raw_dataset("folder", data, "train")
        prepare_five_crops(raw, data / "hpseg_prepared" / "train_32", crop_size=32)
    return data


def tiny_config(data_root: Path, runs: Path, steps: int = 12, extra: list[str] | None = None) -> Config:
    return Config().override(tiny_overrides(data_root, runs, steps) + list(extra or []))


def clustered_batch(hw: int, batch: int, width_f: int, dim: int, rho: float, seed: int = 3):
    """Features in 4 tight clusters and pools between two clusters each (similarity about 0.7 to
    both), so that no similarity lies near a threshold: half-precision products flip no positive.

    Returns f (N, width_f), s (N, dim), normalised z and z_mix (N, dim), the pools and a (hw, N) pattern.
    """
    g = torch.Generator().manual_seed(seed)
    n = hw * batch

    def clustered(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        prototypes = torch.linalg.qr(torch.randn(width, 4, generator=g))[0].T  # orthonormal rows
        labels = torch.randint(4, (n,), generator=g)
        # Noise of one norm at every width (0.05 per coordinate at width 24).
        features = prototypes[labels] + 0.05 * torch.randn(n, width, generator=g) / (width / 24) ** 0.5
        return features, prototypes[[0, 1, 2]] + prototypes[[1, 2, 3]]

    (f, pool_ag), (s, pool_sp) = clustered(width_f), clustered(dim)
    z = F.normalize(s + 0.5 * torch.randn(n, dim, generator=g), dim=1)
    z_mix = F.normalize(z + 0.3 * torch.randn(n, dim, generator=g), dim=1)
    return f, s, z, z_mix, pool_ag, pool_sp, torch.rand(hw, n, generator=g) < rho


class Notices(logging.Handler):
    """The messages of the ``hpseg`` logger's records (INFO and above); see the ``notices`` fixture."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
