"""``hpseg predict``: any image size and mode, folders, globs, bad files, atomic outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hpseg
import hpseg.cli.predict
import hpseg.inference.crf
import hpseg.inference.crf_numpy
from hpseg.cli.main import main
from hpseg.cli.predict import collect_images
from hpseg.data import read_image
from hpseg.files import OUTPUT_MARKER


@pytest.fixture(scope="module")
def checkpoint(tiny_run: Path) -> Path:
    return tiny_run / "checkpoints" / "last.pt"


def _save(path: Path, height: int, width: int, mode: str = "RGB", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(array, "RGBA").convert(mode)
    image.save(path)
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    _save(root / "a" / "x.png", 37, 53)
    _save(root / "b" / "x.png", 20, 31, "L", seed=1)  # same name, other folder
    _save(root / "b" / "deep" / "y.png", 61, 17, "RGBA", seed=2)
    _save(root / "c.png", 33, 33, seed=3)
    _save(root / "c.jpg", 40, 30, seed=4)  # same stem as c.png
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "notes.txt").write_text("not an image")
    return root


def _outputs(out: Path) -> set[str]:
    """The files predict wrote into ``out``, its marker (hpseg.files.OUTPUT_MARKER) left out."""
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != OUTPUT_MARKER}


def test_predict_folder_mirrors_paths_at_input_size(inputs: Path, checkpoint: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["predict", str(inputs), "--checkpoint", str(checkpoint), "--out", str(out), "--figure", "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.out + captured.err and "skipped 1" in captured.out
    expected = {"a/x", "b/x", "b/deep/y", "c.png", "c.jpg"}
    files = _outputs(out)
    for kind in ("labels", "overlays", "figures"):
        assert {f"{kind}/{name}.png" for name in expected} <= files
    assert not [f for f in files if f.endswith(".tmp") or "/." in f]
    sizes = {"a/x": (37, 53), "b/x": (20, 31), "b/deep/y": (61, 17), "c.png": (33, 33), "c.jpg": (40, 30)}
    files_of = {"a/x": "a/x.png", "b/x": "b/x.png", "b/deep/y": "b/deep/y.png", "c.png": "c.png", "c.jpg": "c.jpg"}
    one_at_a_time = hpseg.load(checkpoint, device="cpu")
    for name, (height, width) in sizes.items():
        labels = np.array(Image.open(out / "labels" / f"{name}.png"))
        assert labels.shape == (height, width) and labels.max() < 4
        # several images' windows shared backbone passes, a broken file among them: same labels
        assert np.array_equal(labels, one_at_a_time.segment(read_image(inputs / files_of[name])))
        assert Image.open(out / "overlays" / f"{name}.png").size == (width, height)
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["succeeded"] == 5 and [s["path"] for s in summary["skipped"]] == [str(inputs / "broken.png")]
    assert summary["head"] == "cluster" and summary["labels"][0]["name"] == "cluster 0"


def test_globs_files_and_the_linear_head(inputs: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(["predict", str(inputs / "**" / "x.png"), str(inputs / "c.jpg"), "--checkpoint", str(checkpoint),
               "--out", str(out), "--head", "linear", "--size", "0", "--window", "16", "--no-progress"])
    assert rc == 0
    assert _outputs(out) >= {"labels/a/x.png", "labels/b/x.png", "labels/c.png", "overlays/a/x.png"}
    assert np.array(Image.open(out / "labels" / "c.png")).shape == (40, 30)
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["head"] == "linear" and summary["labels"][0]["name"] == "class 0 (red stripes)"
    assert summary["size"] == 0 and summary["window"] == 16


def test_collect_images_names_never_collide(inputs: Path, tmp_path: Path) -> None:
    jobs, problems = collect_images([str(inputs / "a"), str(inputs / "b"), str(inputs / "a" / "x.png"),
                                     str(tmp_path / "nope"), str(inputs / "*.gif")])
    names = [job.relative.as_posix() for job in jobs]
    assert sorted(names) == ["a/x", "b/deep/y", "b/x"] and len(set(names)) == len(names)
    assert [p[0] for p in problems] == [str(tmp_path / "nope"), str(inputs / "*.gif")]
    # The output folder inside an input folder is not segmented again.
    (inputs / "out" / "labels").mkdir(parents=True)
    _save(inputs / "out" / "labels" / "old.png", 8, 8)
    jobs, _ = collect_images([str(inputs)], exclude=inputs / "out")
    assert not [job for job in jobs if "old" in job.path.name]


def test_mapping_from_an_evaluation_names_classes(inputs: Path, checkpoint: Path, tmp_path: Path) -> None:
    step = torch.load(checkpoint, weights_only=True)["step"]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"checkpoint": str(checkpoint), "step": step, "cluster_to_class": [3, 2, 1, 0]}))
    out = tmp_path / "out"
    rc = main(["predict", str(inputs / "c.png"), "--checkpoint", str(checkpoint), "--out", str(out),
               "--mapping", str(results), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["mapping"] == str(results) and summary["labels"][3]["name"] == "class 3 (violet gradient)"


def test_nothing_readable_exits_nonzero(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main(["predict", str(bad), "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"]) == 1
    assert "bad.png" in capsys.readouterr().out
    assert _outputs(out) == {"predictions.json"}
    assert main(["predict", str(tmp_path / "missing"), "--checkpoint", str(checkpoint), "--out", str(out)]) == 2


def test_crf_missing_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def unavailable() -> None:
        raise hpseg.inference.crf.CRFUnavailableError()

    monkeypatch.setattr(hpseg.inference.crf_numpy, "_import_densecrf", unavailable)  # behind require_crf
    image = _save(tmp_path / "i.png", 10, 10)
    out = tmp_path / "out"
    # The checkpoint does not even exist: the CRF check comes first.
    rc = main(["predict", str(image), "--checkpoint", str(tmp_path / "none.pt"), "--out", str(out), "--crf"])
    assert rc == 2 and "hpseg[crf]" in capsys.readouterr().err and not out.exists()


def test_crf_output_at_input_size(tmp_path: Path, checkpoint: Path) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    image = _save(tmp_path / "i.png", 29, 45)
    out = tmp_path / "out"
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--crf", "--no-progress"]) == 0
    assert np.array(Image.open(out / "labels" / "i.png")).shape == (29, 45)


def test_crf_prefers_the_mapping_of_a_crf_evaluation(checkpoint: Path, tmp_path: Path) -> None:
    """Defect: ``hpseg predict --crf`` took the plain evaluation's matching over the CRF one's."""
    pytest.importorskip("pydensecrf.densecrf")
    copy = tmp_path / "run" / "checkpoints" / "last.pt"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(checkpoint.read_bytes())
    step = torch.load(checkpoint, weights_only=True)["step"]
    evaluations = {}
    for name, mapping in (("eval-last", [0, 1, 2, 3]), ("eval-last-crf", [3, 2, 1, 0])):
        evaluations[name] = tmp_path / "run" / name / "results.json"
        evaluations[name].parent.mkdir()
        evaluations[name].write_text(json.dumps({"checkpoint": str(copy), "step": step, "cluster_to_class": mapping}))
    image = _save(tmp_path / "i.png", 16, 24)
    for flags, expected in (([], "eval-last"), (["--crf"], "eval-last-crf")):
        out = tmp_path / f"out{len(flags)}"
        assert main(["predict", str(image), "--checkpoint", str(copy), "--out", str(out), "--quiet", *flags]) == 0
        summary = json.loads((out / "predictions.json").read_text())
        assert summary["mapping"] == str(evaluations[expected]) and summary["crf"] == bool(flags)


def test_a_failed_write_leaves_no_partial_output(inputs: Path, checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(hpseg.cli.predict, "overlay", full_disk)  # the second file of an image
    out = tmp_path / "out"
    rc = main(["predict", str(inputs / "c.png"), "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress"])
    assert rc == 2
    assert not _outputs(out)


def test_predict_onnx_without_onnxruntime_says_how_to_install(inputs: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """One line naming the pip command and the usage-error status 2, not a traceback and 1."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    assert main(["predict", str(inputs), "--onnx", str(tmp_path / "model.onnx"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpseg predict: error: onnxruntime is not installed"), lines
    assert 'pip install "hpseg[onnx]"' in lines[0]


def test_predict_warns_about_a_random_backbone(checkpoint: Path, inputs: Path, tmp_path: Path, notices) -> None:
    """The tiny run's backbone is a random initialisation, as the demo's: say that its segments of
    real photos mean nothing, as the demo itself does."""
    assert main(["predict", str(inputs), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    warned = [m for m in notices.messages if "RANDOMLY INITIALISED" in m]
    assert len(warned) == 1 and str(checkpoint) in warned[0] and "vit_tiny_p8" in warned[0]
    assert hpseg.load(checkpoint, device="cpu").random_backbone
