"""The validation feature cache (hpseg.training.validation_cache): the same metrics as the backbone
path, and a stale cache rebuilt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hpseg.backbones import create_backbone
from hpseg.data import ValCrops, build_raw_dataset
from hpseg.evaluation.protocol import evaluate_model, validation_loader
from hpseg.runtime import DistributedContext
from hpseg.training.cache import backbone_fingerprint
from hpseg.training.trainer import Trainer
from hpseg.training.validation_cache import validation_features

from .helpers import synthetic_prepared, tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Its own dataset, not conftest's shared one: six validation images (cache identities over
    different image subsets)."""
    return synthetic_prepared(tmp_path_factory.mktemp("synthetic_val_cache"), n_val=6)


def validation_set(data_root, size: int = 32) -> ValCrops:
    return ValCrops(build_raw_dataset("folder", data_root, "val", n_classes=4), size=size)


def tiny_backbone(perturbed: bool = False):
    backbone = create_backbone("vit_tiny_p8", pretrained=False).eval()
    if perturbed:  # other weights, same architecture
        with torch.no_grad():
            next(backbone.parameters()).add_(0.01)
    return backbone


class RoundedToHalf(torch.nn.Module):
    """The backbone with its features rounded to float16, as the cache stores them."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        out = self.backbone(images)
        out.features = out.features.to(torch.float16).float()
        return out


@pytest.mark.parametrize("setting", ["memory", "disk"])
def test_cached_validation_gives_the_metrics_of_the_backbone_path(data_root, tmp_path, setting):
    trainer = Trainer(tiny_config(data_root, tmp_path / "runs", extra=[f"data.val_feature_cache={setting}",
                                                                       "train.val_max_images=0"]), tmp_path / "run")
    cached = trainer._evaluate()
    assert trainer.validation_features is not None and len(trainer.validation_features.features) == 6
    assert (trainer.validation_features.where == "memory") == (setting == "memory")
    loader = validation_loader(trainer.validation, 16, 0, DistributedContext())
    n_classes = trainer.config.method.n_classes
    # Exactly the backbone path's metrics on float16-rounded features ...
    rounded = evaluate_model(trainer.model, RoundedToHalf(trainer.backbone), loader, n_classes, CPU)
    assert cached == rounded
    # ... and within float16 rounding of today's float32 path.
    today = evaluate_model(trainer.model, trainer.backbone, loader, n_classes, CPU)
    assert cached.n_pixels == today.n_pixels > 0
    for key, value in cached.metrics().items():
        assert abs(value - today.metrics()[key]) < 0.01, key
    # A second validation reads the same features again (no recomputation).
    features = trainer.validation_features
    assert trainer._evaluate().linear == cached.linear
    assert trainer.validation_features is features


def test_off_runs_the_backbone_at_every_validation(data_root, tmp_path):
    trainer = Trainer(tiny_config(data_root, tmp_path / "runs", extra=["data.val_feature_cache=off"]), tmp_path / "r")
    calls = {"n": 0}
    forward = trainer.backbone.forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    trainer.backbone.forward = counted
    trainer._evaluate()
    trainer._evaluate()
    assert trainer.validation_features is None and calls["n"] == 2  # 4 images, one batch per validation


def disk_features(data_root, cache_dir, backbone, size: int = 32, indices=(0, 1, 2, 3)):
    return validation_features("disk", validation_set(data_root, size), list(indices), backbone, CPU, None,
                               cache_dir=cache_dir)


def mark(cache_dir) -> None:
    """Overwrite the stored features with a marker value (a reused cache keeps it)."""
    meta = json.loads((cache_dir / "meta.json").read_text())
    entry = meta["arrays"]["features"]
    array = np.memmap(cache_dir / entry["file"], dtype=entry["dtype"], mode="r+", shape=tuple(entry["shape"]))
    array[:] = 7.0
    array.flush()


def test_a_stale_disk_cache_is_rebuilt(data_root, tmp_path, notices):
    cache_dir = tmp_path / "val_cache"
    backbone = tiny_backbone()
    first = disk_features(data_root, cache_dir, backbone)
    assert first.where == str(cache_dir) and (cache_dir / "meta.json").is_file()
    reference = torch.from_numpy(np.array(first.features)).float()
    with torch.no_grad():
        expected = backbone(validation_set(data_root)[0]["image"][None]).features
    torch.testing.assert_close(reference[:1], expected, rtol=2**-10, atol=1e-3)

    mark(cache_dir)  # same identity: reused as stored
    assert float(np.array(disk_features(data_root, cache_dir, backbone).features).max()) == 7.0
    assert not any("stale" in m for m in notices.messages)

    changes = {
        "backbone weights (fingerprint)": lambda: disk_features(data_root, cache_dir, tiny_backbone(perturbed=True)),
        "validation size": lambda: disk_features(data_root, cache_dir, backbone, size=40),
        "number of validation images": lambda: disk_features(data_root, cache_dir, backbone, indices=(0, 1, 2)),
        "image names and sizes (hash)": lambda: disk_features(data_root, cache_dir, backbone, indices=(0, 1, 2, 5)),
    }
    assert backbone_fingerprint(tiny_backbone(perturbed=True)) != backbone_fingerprint(backbone)
    for reason, build in changes.items():
        disk_features(data_root, cache_dir, backbone)  # back to the first identity (rebuilt when it differs)
        mark(cache_dir)
        rebuilt = build()
        assert float(np.array(rebuilt.features).max()) != 7.0, reason
        assert any(reason in m and "rebuilding" in m for m in notices.messages), reason


def test_an_unknown_setting_is_refused(data_root, tmp_path):
    with pytest.raises(ValueError, match="data.val_feature_cache='sometimes'"):
        validation_features("sometimes", validation_set(data_root), [0], tiny_backbone(), CPU, None,
                            cache_dir=tmp_path)
