"""Checkpoints in the layout of the authors' implementation: imported, or loaded directly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hpseg
from hpseg.checkpoints.authors import infer_backbone
from hpseg.checkpoints.payload import load_checkpoint
from hpseg.checkpoints.store import CheckpointError
from hpseg.cli.main import main
from tests.helpers import (
    AUTHORS_CLASSES,
    AUTHORS_DIM,
    AUTHORS_PATCH,
    AUTHORS_WIDTH,
    Notices,
    authors_payload,
    authors_vit,
    dino_reference_positions,
)

C, D, N_CLASSES, PATCH = AUTHORS_WIDTH, AUTHORS_DIM, AUTHORS_CLASSES, AUTHORS_PATCH

def independent_segmentation(payload: dict, images: torch.Tensor) -> torch.Tensor:
    """s = Conv(f) + Conv(ReLU(Conv(f))) straight from the authors' tensors (no hpseg code)."""
    net = payload["net_model_state_dict"]
    vit = authors_vit()
    vit.load_state_dict({k[len("model."):]: v for k, v in net.items() if k.startswith("model.")})
    vit.eval()
    with torch.no_grad():
        # DINO's own position interpolation (the authors' ViT), written out in test_backbones.
        patches = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(len(images), -1, -1), patches], 1)
        x = x + dino_reference_positions(vit.pos_embed, images, PATCH)
        for block in vit.blocks:
            x = block(x)
        tokens = vit.norm(x)[:, 1:]
        b, _, h, w = images.shape
        f = tokens.transpose(1, 2).reshape(b, C, h // PATCH, w // PATCH)
        linear = F.conv2d(f, net["cluster1.0.weight"], net["cluster1.0.bias"])
        hidden = F.relu(F.conv2d(f, net["cluster2.0.weight"], net["cluster2.0.bias"]))
        return linear + F.conv2d(hidden, net["cluster2.2.weight"], net["cluster2.2.bias"])


@pytest.fixture
def authors_file(tmp_path: Path) -> tuple[Path, dict]:
    payload = authors_payload()
    path = tmp_path / "authors.pth"
    torch.save(payload, path)
    return path, payload


def _normalised(array: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std)[None]


def test_import_round_trip_gives_the_authors_features(authors_file: tuple[Path, dict], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path, payload = authors_file
    out = tmp_path / "converted" / "hp.pt"
    assert main(["import-checkpoint", str(path), "--out", str(out), "--dataset", "folder"]) == 0
    assert "vit_tiny_p8" in capsys.readouterr().out
    weights = out.with_name("hp.backbone.safetensors")
    assert out.is_file() and weights.is_file()
    checkpoint = load_checkpoint(out)
    assert checkpoint.backbone.to_dict() == {"name": "vit_tiny_p8", "weights": str(weights.resolve()),
                                             "pretrained": True, "official_weights": None}
    assert checkpoint.config.method.dim == D and checkpoint.config.method.n_classes == N_CLASSES
    model = checkpoint.model
    assert torch.equal(model["cluster_probe.centroids"], payload["cluster_model_state_dict"]["clusters"])
    assert torch.equal(model["ema_segmentation.nonlinear.2.weight"],
                       payload["net_model_state_dict"]["ema_model2.2.weight"])
    assert torch.equal(model["linear_probe.classifier.weight"], payload["linear_model_state_dict"]["weight"])

    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    expected = independent_segmentation(payload, _normalised(image))[0]
    segmenter = hpseg.load(out, device="cpu", size=0, window=0)
    features = segmenter.features(image)
    torch.testing.assert_close(features.segmentation, expected, rtol=1e-4, atol=1e-5)
    # The cluster head is the argmax of <s, c_k / ||c_k||>, upsampled.
    scores = torch.einsum("dhw,kd->khw", expected, F.normalize(payload["cluster_model_state_dict"]["clusters"], dim=1))
    upsampled = F.interpolate(scores[None], size=(32, 48), mode="bilinear", align_corners=False)[0].argmax(0)
    assert np.array_equal(segmenter.segment(image), upsampled.numpy())

    # The pair of files moves together: the weights are found beside the checkpoint.
    moved = tmp_path / "moved"
    shutil.move(str(out.parent), str(moved))
    again = hpseg.load(moved / "hp.pt", device="cpu", size=0, window=0)
    torch.testing.assert_close(again.features(image).segmentation, expected, rtol=1e-4, atol=1e-5)


def test_authors_file_loads_directly(authors_file: tuple[Path, dict], notices: Notices) -> None:
    path, payload = authors_file
    segmenter = hpseg.load(path, device="cpu", size=0, window=0)
    assert "authors' checkpoint" in notices.messages[0] and str(path) in notices.messages[0]
    image = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    torch.testing.assert_close(segmenter.features(image).segmentation,
                               independent_segmentation(payload, _normalised(image))[0], rtol=1e-4, atol=1e-5)
    assert segmenter.segment(image, head="linear").shape == (16, 24)


def test_loading_a_authors_file_leaves_the_callers_random_numbers_alone(authors_file: tuple[Path, dict]) -> None:
    """Defect: the conversion called ``torch.manual_seed(0)``, reseeding the caller's generator."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    hpseg.load(authors_file[0], device="cpu")
    assert torch.equal(torch.rand(4), expected)


def test_backbone_inferred_from_shapes() -> None:
    def fake(width: int, patch: int, depth: int) -> dict:
        state = {"patch_embed.proj.weight": torch.empty(width, 3, patch, patch)}
        state.update({f"blocks.{i}.norm1.weight": torch.empty(width) for i in range(depth)})
        return state

    assert infer_backbone(fake(384, 8, 12), Path("x")) == "dino_vits8"
    assert infer_backbone(fake(384, 16, 12), Path("x")) == "dino_vits16"
    assert infer_backbone(fake(768, 8, 12), Path("x")) == "dino_vitb8"
    assert infer_backbone(fake(768, 16, 12), Path("x")) == "dino_vitb16"
    with pytest.raises(CheckpointError, match="width 512"):
        infer_backbone(fake(512, 16, 12), Path("x"))


def test_clear_errors_name_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = authors_payload()
    del payload["net_model_state_dict"]["cluster2.2.weight"]
    missing = tmp_path / "missing_key.pth"
    torch.save(payload, missing)
    assert main(["import-checkpoint", str(missing), "--out", str(tmp_path / "a.pt")]) == 2
    err = capsys.readouterr().err
    assert "missing_key.pth" in err and "cluster2.2.weight" in err
    assert not (tmp_path / "a.pt").exists()

    payload = authors_payload()
    payload["linear_model_state_dict"]["weight"] = torch.randn(N_CLASSES, D + 1, 1, 1)
    wrong = tmp_path / "wrong_shape.pth"
    torch.save(payload, wrong)
    with pytest.raises(CheckpointError, match=r"wrong_shape.pth.*linear_probe.classifier.weight"):
        hpseg.load(wrong)

    payload = authors_payload()
    del payload["cluster_model_state_dict"]
    torch.save(payload, tmp_path / "no_cluster.pth")
    with pytest.raises(CheckpointError, match="cluster_model_state_dict"):
        hpseg.load(tmp_path / "no_cluster.pth")


class Arbitrary:
    """Any Python object: loading it would mean running unpickling code."""


def test_pickled_objects_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = authors_payload()
    payload["args"] = Arbitrary()
    path = tmp_path / "pickled.pth"
    torch.save(payload, path)
    assert main(["import-checkpoint", str(path), "--out", str(tmp_path / "b.pt")]) == 2
    assert "pickled.pth" in capsys.readouterr().err and not (tmp_path / "b.pt").exists()
