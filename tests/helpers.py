"""Shared builders for tests: a synthetic dataset and a tiny, fast training config."""

from __future__ import annotations

from pathlib import Path

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
        prepare_five_crops(raw, data / "hpseg_prepared" / "train_32", crop_size=32, progress=False)
    return data


def tiny_config(data_root: Path, runs: Path, steps: int = 12, extra: list[str] | None = None) -> Config:
    return Config().override(tiny_overrides(data_root, runs, steps) + list(extra or []))
