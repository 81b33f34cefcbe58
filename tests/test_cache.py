"""Feature cache (hpseg.training.cache, `hpseg cache`): same training, resumable build, checked validity."""

import json
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from hpseg.backbones import create_backbone
from hpseg.cli.main import main
from hpseg.training.cache import (
    CachedFeatures,
    FeatureCacheError,
    build_feature_cache,
    default_cache_dir,
    validate_cache,
)
from hpseg.training.features import BackboneFeatures
from hpseg.training.trainer import train
from tests.helpers import synthetic_prepared, tiny_config, tiny_overrides

SIGMA = 28.0


def messages(notices) -> str:
    """What the hpseg logger said since the last call (the ``notices`` fixture of conftest)."""
    text = "\n".join(notices.messages)
    notices.messages.clear()
    return text


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Its own dataset, not conftest's shared one: a test here builds the cache in its default
    place inside the dataset, where every later training on it would find it."""
    return synthetic_prepared(tmp_path_factory.mktemp("synthetic_cache"))


def prepared(data_root):
    return data_root / "hpseg_prepared" / "train_32"


def tiny_backbone(perturbed=False):
    backbone = create_backbone("vit_tiny_p8", pretrained=False)
    if perturbed:  # other weights: one parameter of one block moved a little
        with torch.no_grad():
            backbone.model.blocks[0].attn.qkv.weight[0, 0] += 1e-3
    return backbone


def build(backbone, prepared_dir, cache_dir, **kwargs):
    options = {"sigma": SIGMA, "batch_size": 4, **kwargs}
    return build_feature_cache(backbone, prepared_dir, cache_dir, **options)


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in records if "loss" in r])


def test_cached_inputs_equal_backbone_inputs(data_root, tmp_path):
    backbone = tiny_backbone()
    cache = build(backbone, prepared(data_root), tmp_path / "c", dtype="float32")
    validate_cache(cache, backbone, prepared(data_root), SIGMA)
    live = BackboneFeatures(backbone, str(prepared(data_root)), with_augmented=False, sigma=SIGMA,
                            device=torch.device("cpu"), amp_dtype=None)
    cached = CachedFeatures(cache, prepared(data_root), with_augmented=False, device=torch.device("cpu"))
    assert len(cached) == len(live) == 40 and cached.class_names == live.class_names
    assert len(live.class_names) == 4
    batches = [[7, 0, 31, 12], [39, 5, 22, 18]]  # other batch compositions than the build's
    seeds = [3, 4]
    for a, b in zip(live.steps(batches, seeds), cached.steps(batches, seeds)):
        assert b.features.dtype == torch.float32 and b.features.shape == a.features.shape == (4, 64, 4, 4)
        torch.testing.assert_close(b.features, a.features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.neighbour_weights, a.neighbour_weights, rtol=1e-5, atol=1e-5)
        assert torch.equal(b.labels, a.labels) and b.features_aug is None
    for a, b in zip(live.feature_maps(batches), cached.feature_maps(batches)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_training_from_the_cache_gives_the_same_loss_curve(data_root, tmp_path, notices):
    """alpha = 0: nothing random differs. float32 storage: equal to float rounding (rel 1e-5);
    float16 storage (the default): within rel 1e-2 at every step, median under 1e-3 (measured:
    max 1.6e-3, median 1e-5)."""
    backbone = tiny_backbone()
    # On the CPU also where a GPU is present: equal loss curves need float32 arithmetic (CUDA runs fp16 AMP).
    extra = ["method.alpha=0.0", "train.val_interval=100", "train.device=cpu"]
    reference = losses(train(tiny_config(data_root, tmp_path, extra=extra + ["train.run_name=live"]),
                             backbone=backbone))
    assert "no feature cache at" in messages(notices)

    exact = build(backbone, prepared(data_root), tmp_path / "f32", dtype="float32")
    run = train(tiny_config(data_root, tmp_path, extra=extra + ["train.run_name=f32", f"data.feature_cache={exact}"]),
                backbone=backbone)
    np.testing.assert_allclose(losses(run), reference, rtol=1e-5)

    # float16 at the default place, picked up without naming it
    default = build(backbone, prepared(data_root), default_cache_dir(prepared(data_root), "vit_tiny_p8"))
    try:
        notices.messages.clear()
        run = train(tiny_config(data_root, tmp_path, extra=extra + ["train.run_name=f16"]),
                    backbone=backbone)
        assert "training from the feature cache" in messages(notices)
        half = losses(run)
        relative = np.abs(half - reference) / np.abs(reference)
        # Rounding f moves a few similarities across a positive threshold now and then: a step may
        # differ by ~1e-3; most differ by ~1e-5.
        assert relative.max() < 1e-2 and np.median(relative) < 1e-3
        assert len(half) == 12 and not np.array_equal(half, reference)  # float16 did round something
    finally:
        shutil.rmtree(default.parent)  # the data set is shared by this module's tests


def test_photometric_view_still_uses_the_backbone(data_root, tmp_path):
    """alpha > 0: the cache serves f and the LHP weights; the augmented view (same random draws as
    without the cache) goes through the backbone — same losses."""
    backbone = tiny_backbone()
    # On the CPU also where a GPU is present: equal loss curves need float32 arithmetic (CUDA runs fp16 AMP).
    extra = ["method.alpha=0.5", "train.val_interval=100", "train.max_steps=6", "train.device=cpu"]
    reference = losses(train(tiny_config(data_root, tmp_path, extra=extra + ["train.run_name=live"]),
                             backbone=backbone))
    cache = build(backbone, prepared(data_root), tmp_path / "c", dtype="float32")
    run = train(tiny_config(data_root, tmp_path, extra=extra + ["train.run_name=cached", f"data.feature_cache={cache}"]),
                backbone=backbone)
    np.testing.assert_allclose(losses(run), reference, rtol=1e-5)
    consistency = [json.loads(x)["consistency"] for x in (run / "metrics.jsonl").read_text().splitlines()
                   if "consistency" in x]
    assert all(c > 0 for c in consistency)


def test_interrupted_build_resumes_to_the_same_files(data_root, tmp_path, monkeypatch):
    backbone = tiny_backbone()
    whole = build(backbone, prepared(data_root), tmp_path / "whole")

    calls = {"n": 0}
    original = backbone.forward

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone, "forward", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build(backbone, prepared(data_root), tmp_path / "part")
    part = tmp_path / "part"
    assert not (part / "meta.json").exists()
    assert json.loads((part / "progress.json").read_text())["completed"] == 8  # two batches of 4
    with pytest.raises(FeatureCacheError, match=r"incomplete \(8 of 40 crops\).*hpseg cache"):
        validate_cache(part, backbone, prepared(data_root), SIGMA)

    calls["n"] = -100
    build(backbone, prepared(data_root), part)
    assert calls["n"] == -100 + 8  # only the 32 remaining crops (8 batches) were computed
    assert not (part / "progress.json").exists()
    for name in ("features.f16", "neighbour_weights.f32"):
        assert (part / name).read_bytes() == (whole / name).read_bytes()
    meta = json.loads((part / "meta.json").read_text())
    assert meta["completed"] == 40 and meta["features"]["shape"] == [40, 64, 4, 4]
    assert meta["neighbour_weights"]["shape"] == [40, 16, 9] and meta["backbone"]["name"] == "vit_tiny_p8"

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete cache is not recomputed")

    monkeypatch.setattr(backbone, "forward", must_not_run)
    build(backbone, prepared(data_root), part)  # complete: returns at once


def test_invalid_caches_are_refused(data_root, tmp_path):
    backbone = tiny_backbone()
    cache = build(backbone, prepared(data_root), tmp_path / "c")
    other = tiny_backbone(perturbed=True)
    with pytest.raises(FeatureCacheError, match=r"backbone weights \(fingerprint\).*hpseg cache"):
        validate_cache(cache, other, prepared(data_root), SIGMA)
    with pytest.raises(FeatureCacheError, match="LHP sigma"):
        validate_cache(cache, backbone, prepared(data_root), 14.0)
    with pytest.raises(FeatureCacheError, match=r"no feature cache in .*hpseg cache"):
        validate_cache(tmp_path / "nothing", backbone, prepared(data_root), SIGMA)

    # another prepared set (other images, other count) with the same backbone
    other_root = synthetic_prepared(tmp_path / "other", n_train=4)
    with pytest.raises(FeatureCacheError, match="number of training crops"):
        validate_cache(cache, backbone, prepared(other_root), SIGMA)

    # a damaged data file
    with open(cache / "features.f16", "r+b") as stream:
        stream.truncate(100)
    with pytest.raises(FeatureCacheError, match="wrong size"):
        validate_cache(cache, backbone, prepared(data_root), SIGMA)

    # building over a complete cache of another backbone needs overwrite
    good = build(backbone, prepared(data_root), tmp_path / "good")
    with pytest.raises(FeatureCacheError, match="--overwrite"):
        build(other, prepared(data_root), good)
    build(other, prepared(data_root), good, overwrite=True)
    validate_cache(good, other, prepared(data_root), SIGMA)


def test_caches_on_other_crops_are_refused_with_the_reason(data_root, tmp_path):
    """A cache records how its crops were made: the same images cut as PNG instead of JPEG are
    refused, naming the crop format; a cache written before the recipe was recorded (all on five
    PNG crops) still fits a PNG set."""
    from hpseg.data import build_raw_dataset, prepare_five_crops
    from hpseg.training.cache.identity import META_NAME

    backbone = tiny_backbone()
    cache = build(backbone, prepared(data_root), tmp_path / "jpeg")
    png = prepare_five_crops(build_raw_dataset("folder", data_root, "train"), tmp_path / "png", crop_size=32,
                             crop_format="png")
    with pytest.raises(FeatureCacheError, match=r"crop image format: 'jpeg' in the cache, 'png' now.*--overwrite"):
        validate_cache(cache, backbone, png, SIGMA)
    old = build(backbone, png, tmp_path / "old")
    meta = json.loads((old / META_NAME).read_text())
    for key in ("crop_rule", "crop_format", "stored_size"):
        del meta["data"][key]
    (old / META_NAME).write_text(json.dumps(meta))
    validate_cache(old, backbone, png, SIGMA)
    with pytest.raises(FeatureCacheError, match="crop image format"):
        validate_cache(old, backbone, prepared(data_root), SIGMA)


def test_format_1_caches_are_refused_with_the_reason(data_root, tmp_path):
    """Caches of format 1 hold LHP weights computed from the attention probabilities: refused."""
    from hpseg.training.cache.identity import CACHE_VERSION, META_NAME

    assert CACHE_VERSION == 2
    backbone = tiny_backbone()
    cache = build(backbone, prepared(data_root), tmp_path / "old", dtype="float32")
    meta = json.loads((cache / META_NAME).read_text())
    (cache / META_NAME).write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(FeatureCacheError, match=r"format version 1.*probabilities.*pre-softmax scores.*--overwrite"):
        validate_cache(cache, backbone, prepared(data_root), SIGMA)


def test_training_stops_on_a_cache_that_does_not_fit(data_root, tmp_path):
    backbone = tiny_backbone()
    root = synthetic_prepared(tmp_path / "own")  # its own data: the default cache place is per data set
    build(tiny_backbone(perturbed=True), prepared(root), default_cache_dir(prepared(root), "vit_tiny_p8"))
    with pytest.raises(FeatureCacheError, match=r"does not fit this run.*data.feature_cache=off"):
        train(tiny_config(root, tmp_path, steps=2), backbone=backbone)
    # off: the backbone is used, the cache ignored
    run = train(tiny_config(root, tmp_path, steps=2, extra=["data.feature_cache=off", "train.run_name=off"]),
                backbone=backbone)
    assert len(losses(run)) == 2
    # a named cache must exist
    with pytest.raises(FeatureCacheError, match="no feature cache in"):
        train(tiny_config(root, tmp_path, steps=2, extra=[f"data.feature_cache={tmp_path / 'missing'}",
                                                          "train.run_name=m"]), backbone=backbone)


def test_disk_too_small(data_root, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("hpseg.training.cache.builder.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(FeatureCacheError, match=r"not enough disk space .* in .*small.* needs 104960 bytes .* 1000 bytes"):
        build(tiny_backbone(), prepared(data_root), tmp_path / "small")
    assert not (tmp_path / "small" / "features.f16").exists()


def test_size_estimate_is_logged_first(data_root, tmp_path, notices):
    build(tiny_backbone(), prepared(data_root), tmp_path / "c")
    lines = notices.messages
    assert "40 crops" in lines[0] and "160.0 KiB (float16)" not in lines[0] and "80.0 KiB (float16)" in lines[0]
    assert "22.5 KiB (float32)" in lines[0]
    assert (tmp_path / "c" / "features.f16").stat().st_size == 40 * 64 * 16 * 2


def test_cli_cache_then_train_reads_it(tmp_path, capsys, notices):
    root = synthetic_prepared(tmp_path / "cli")
    overrides = tiny_overrides(root, tmp_path / "runs", steps=2) + ["method.alpha=0.0"]
    assert main(["cache", "--preset", "potsdam3", *overrides]) == 0
    cache = default_cache_dir(prepared(root), "vit_tiny_p8")
    assert "feature cache of 40 crops" in messages(notices)
    assert f"feature cache ready in {cache}" in capsys.readouterr().out
    assert json.loads((cache / "meta.json").read_text())["completed"] == 40
    # the random backbone of `hpseg cache` is the one `hpseg train` builds: the cache fits
    assert main(["train", "--preset", "potsdam3", *overrides, "train.run_name=r"]) == 0
    assert "training from the feature cache" in messages(notices)
    # a second `hpseg cache` finds it complete
    assert main(["cache", "--preset", "potsdam3", *overrides]) == 0
    assert "complete and up to date" in messages(notices)
    # another sigma: refused without --overwrite, with a message and exit status 2
    assert main(["cache", "--preset", "potsdam3", *overrides, "method.sigma=10"]) == 2
    assert "--overwrite" in capsys.readouterr().err
