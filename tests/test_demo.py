"""``hpseg demo``: a fast variant end to end, and how it picks its backbone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpseg.backbones import create_backbone
from hpseg.cli import demo
from hpseg.cli.main import main
from tests.helpers import Notices

# On the CPU also where a GPU is present: the checks of equal numbers assume one device's arithmetic
# (on an H200 the figure's k-means and the evaluation's differed in the 4th digit).
FAST = ["--steps", "4", "--image-size", "32", "--crop-size", "16", "--n-train", "8", "--n-val", "4",
        "--batch-size", "8", "--quiet", "--device", "cpu"]


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert "RANDOMLY INITIALISED" in captured.err  # a warning: shown even with --quiet
    text = captured.out
    assert "What the numbers mean" in text and "Hungarian" in text and "The backbone is random here" in text
    assert str(out / "figure.png") in text and str(out / "metrics.json") in text
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("hp", "baseline"):
        assert set(metrics[side]) >= {"unsupervised_accuracy", "unsupervised_miou", "linear_accuracy", "linear_miou"}
        assert all(0.0 <= v <= 1.0 for v in metrics[side].values())
    assert metrics["backbone"] == "vit_tiny_p8" and metrics["backbone_weights"] == "random initialisation"
    assert set(metrics["hp_features_kmeans"]) >= {"unsupervised_accuracy", "unsupervised_miou", "cluster_to_class"}
    assert metrics["figure_baseline_accuracy"] == pytest.approx(metrics["baseline"]["unsupervised_accuracy"])
    assert metrics["settings"]["steps"] == 4 and metrics["timings"]["total_s"] > 0
    figure = Image.open(out / "figure.png")
    assert figure.width > 5 * 128 and figure.height > 4 * 128  # 5 columns, 4 validation rows + titles + legend
    # The evaluation of the demo's checkpoint is where predict finds its cluster -> class mapping.
    results = json.loads((out / "run" / "eval-last" / "results.json").read_text())
    assert results["cluster_to_class"] == metrics["cluster_to_class"]
    assert results["hp"] == metrics["hp"]

    # The model segments other images at their size, with class names from that evaluation.
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 23, 3), dtype=np.uint8)).save(image)
    predictions = tmp_path / "predictions"
    assert main(["predict", str(image), "--checkpoint", str(out / "run" / "checkpoints" / "last.pt"),
                 "--out", str(predictions), "--quiet"]) == 0
    summary = json.loads((predictions / "predictions.json").read_text())
    assert summary["mapping"] == str(out / "run" / "eval-last" / "results.json")
    assert summary["labels"][0]["name"] == "class 0 (red stripes)" and len(summary["labels"]) == 6
    assert np.array(Image.open(predictions / "labels" / "photo.png")).shape == (45, 23)


def test_backbone_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, notices: Notices) -> None:
    notes = notices.messages
    name, weights, pretrained = demo._choose_backbone(tmp_path, None, None)
    assert (name, pretrained) == ("vit_tiny_p8", False) and "RANDOMLY INITIALISED" in notes[-1]
    # The random initialisation is saved, so evaluation and prediction use exactly these weights.
    expected = create_backbone("vit_tiny_p8", pretrained=False).model.state_dict()
    loaded = create_backbone("vit_tiny_p8", weights=weights).model.state_dict()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)

    # A weights file given on the command line is used as it is.
    name, used, pretrained = demo._choose_backbone(tmp_path, weights, "vit_tiny_p8")
    assert (name, used, pretrained) == ("vit_tiny_p8", weights, True) and "with the weights in" in notes[-1]

    # Official weights already in the Hugging Face cache are found without any download.
    monkeypatch.setattr(demo, "_official_weights_in_cache", lambda name: Path("/cache/dino.safetensors"))
    name, used, pretrained = demo._choose_backbone(tmp_path, None, None)
    assert (name, used, pretrained) == ("dino_vits16", "/cache/dino.safetensors", True)
    assert "official DINO weights" in notes[-1]


def test_cache_lookup_is_offline_and_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The lookup reads the Hub cache only (never downloads), answers at once and restores the
    environment; what it answers is what the cache holds."""
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo's cache lookup tried to download")

    looked_up: list[tuple[str, bool]] = []
    cached: dict[str, str] = {}

    def from_cache(repo_id: str, filename: str, *args: object, **kwargs: object) -> str | None:
        looked_up.append((repo_id, os.environ.get("HF_HUB_OFFLINE") == "1"))
        return cached.get(filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", from_cache)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.time()
    # A backbone from timm's Hub copies (DINOv2) ...
    assert demo._official_weights_in_cache("dinov2_vits14_reg") is None  # nothing cached
    assert looked_up and all(offline for _, offline in looked_up)  # looked up with the Hub offline
    cached.update({name: str(tmp_path / name) for name in ("model.safetensors", "pytorch_model.bin")})
    found = demo._official_weights_in_cache("dinov2_vits14_reg")
    assert found is not None and found.parent == tmp_path
    # ... and the demo's DINO ViT-S/16, DINO's own file in torch.hub's cache (never downloaded here).
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    assert demo._official_weights_in_cache(demo.DINO_BACKBONE) is None
    dino_file = Path(torch.hub.get_dir()) / "checkpoints" / "dino_deitsmall16_pretrain.pth"
    dino_file.parent.mkdir(parents=True)
    dino_file.write_bytes(b"cached")
    assert demo._official_weights_in_cache(demo.DINO_BACKBONE) == dino_file
    assert time.time() - started < 5
    assert "HF_HUB_OFFLINE" not in os.environ  # restored
