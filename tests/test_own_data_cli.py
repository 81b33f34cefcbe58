"""A newcomer's own-data path through the command line: ``prepare`` on a folder with a broken
file, ``train`` offline without weights, and ``train`` on images without labels."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hpseg.backbones import BackboneWeightsError, get_spec
from hpseg.backbones.weights import resolve_official_weights
from hpseg.checkpoints.runs import selected_checkpoint
from hpseg.cli.main import USER_ERROR, main
from hpseg.data import make_synthetic_dataset
from tests.helpers import tiny_overrides


class Terminal(io.StringIO):
    """stderr as on a screen: progress bars are drawn."""

    def isatty(self) -> bool:
        return True


def _folder_with_a_broken_file(root: Path) -> Path:
    """images/a.png, b.png, c.png of which b.png is not an image; returns b.png."""
    (root / "images").mkdir(parents=True)
    for name in ("a", "b", "c"):
        pixels = np.random.default_rng(ord(name)).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{name}.png")
    (root / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 4)
    return root / "images" / "b.png"


def test_prepare_names_the_skip_option_and_counts_the_images_used(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    broken = _folder_with_a_broken_file(tmp_path)
    command = ["prepare", "--data-root", str(tmp_path), "data.dataset=folder", "method.n_classes=3",
               "data.crop_size=8"]
    assert main(command) == USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(broken) in error and "data.skip_bad_images=true" in error

    assert main([*command, "data.skip_bad_images=true"]) == 0
    captured = capsys.readouterr()
    assert "five-crop training set of 2 images ready" in captured.out  # 3 files, one unreadable
    assert "1 unreadable image skipped" in captured.out
    assert f"skipping unreadable image {broken}" in captured.err
    assert "RuntimeWarning" not in captured.err and "warnings.warn" not in captured.err


def test_offline_train_stops_at_once_naming_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached DINO file
    assert main(["train", "--data-root", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"),
                 "data.dataset=folder"]) == USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""  # no config dump burying the error
    lines = captured.err.strip().splitlines()
    assert len(lines) <= 3 and "dino_vits8" in lines[-1]
    assert "--weights FILE" in lines[-1] and "--random-backbone" in lines[-1]


def test_backbone_without_official_weights_names_the_cli_flag() -> None:
    with pytest.raises(BackboneWeightsError, match="--random-backbone"):
        resolve_official_weights(get_spec("vit_tiny_p8"))


def test_unlabelled_training_keeps_the_final_weights_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_synthetic_dataset(tmp_path / "data", n_train=8, n_val=4, size=64, n_classes=4, seed=0)
    for split in ("train", "val"):
        shutil.rmtree(data / split / "labels")
    overrides = tiny_overrides(data, tmp_path / "runs", steps=6)
    assert main(["prepare", *overrides]) == 0
    run = tmp_path / "run"
    screen = Terminal()
    capsys.readouterr()
    monkeypatch.setattr(sys, "stderr", screen)
    assert main(["train", "--run-dir", str(run), *overrides]) == 0  # train.selection=best, the default
    notices, last_line = screen.getvalue(), capsys.readouterr().out.strip().splitlines()[-1]
    assert "train.selection=best needs labelled validation images" in notices
    assert "threshold pools" in notices  # the first pools have a progress bar
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["selection"] == "last"
    assert selected_checkpoint(run) == run / "checkpoints" / "last.pt"
    assert "checkpoints/last.pt" in last_line and str(run / "checkpoints" / "last.pt") in last_line
    assert "does not exist" not in last_line
