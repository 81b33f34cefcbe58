"""The bad-input cases of issue 21 on the newer surfaces: every ``--out`` folder, the collective
timeout variable, ``--seeds``, ``report``, ``clusters``, config keys, the app, ONNX files.

Each case failed (a traceback, an unclear message, lost files or work done before a refusal)
before its fix. Commands run in-process through :func:`hpseg.cli.main.main` (``tests/helpers.py``);
the trained model is the session's tiny run (``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpseg.config import Config
from hpseg.files import OUTPUT_MARKER, OutputFolder, OutputFolderError, claim_output_folder
from hpseg.runtime import collective_timeout
from tests.helpers import fake_results, refused, run, snapshot, tiny_overrides, write_results

# ------------------------------------------------------------------------------------ fixtures

pytestmark = pytest.mark.usefixtures("hpseg_logger")  # main() configures the hpseg logger


@pytest.fixture(scope="module")
def trained(tiny_run: Path) -> Path:
    """The tiny trained run of conftest.py (read-only)."""
    return tiny_run


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


def users_folder(path: Path) -> Path:
    """A folder of the user's own, holding the names a hub export writes and one more."""
    path.mkdir(parents=True)
    (path / "README.md").write_text("# my project\n")
    (path / "config.json").write_text('{"mine": true}\n')
    (path / "data.csv").write_text("a,b\n1,2\n")
    return path


# ------------------------------------------------------------------------------------ --out: the rule


def test_claim_output_folder_fresh_empty_own_foreign_and_file(tmp_path: Path) -> None:
    assert OutputFolder(tmp_path / "checked", "eval").check() == tmp_path / "checked"
    assert not (tmp_path / "checked").exists()  # checking writes nothing: a failure before the writing leaves no folder
    fresh = claim_output_folder(tmp_path / "new" / "deep", "eval")
    assert json.loads((fresh / OUTPUT_MARKER).read_text())["written_by"] == "hpseg eval"
    (fresh / "results.json").write_text("{}")
    assert claim_output_folder(fresh, "eval") == fresh  # its own earlier output
    with pytest.raises(OutputFolderError, match=f"{fresh} already holds results.json .*output of hpseg eval"):
        claim_output_folder(fresh, "predict")
    (tmp_path / "empty").mkdir()
    assert claim_output_folder(tmp_path / "empty", "clusters").is_dir()
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(OutputFolderError, match=f"--out {mine} already holds README.md, config.json, data.csv"):
        claim_output_folder(mine, "report")
    assert snapshot(mine) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        claim_output_folder(tmp_path / "file", "predict")
    (mine / OUTPUT_MARKER).write_text("{torn")  # a damaged marker marks nothing: refused, not overwritten
    with pytest.raises(OutputFolderError, match="already holds"):
        claim_output_folder(mine, "report")


def _command(name: str, trained: Path, data_root: Path, photos: Path, tmp_path: Path, out: Path) -> list[str]:
    checkpoint = str(trained / "checkpoints" / "last.pt")
    if name == "report":
        write_results(tmp_path / "evals" / "seed0", fake_results(0, 0.5))
        return ["report", str(tmp_path / "evals" / "seed0"), "--out", str(out)]
    return {
        "predict": ["predict", str(photos), "--checkpoint", checkpoint, "--out", str(out), "--size", "0"],
        "export-hub": ["export", checkpoint, "--format", "hub", "--out", str(out)],
        "eval": ["eval", checkpoint, "--max-images", "2", "--out", str(out)],
        "clusters": ["clusters", "vit_tiny_p8", "--random-backbone", "--data-root", str(data_root), "--k", "2..3",
                     "--size", "32", "--max-images", "2", "--out", str(out)],
        "demo": ["demo", "--out", str(out), "--steps", "1"],
    }[name]


COMMANDS = ["predict", "export-hub", "eval", "clusters", "report", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_out_folder_of_the_users_own_is_refused_untouched(command: str, trained: Path, data_root: Path,
                                                                photos: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``export --format hub`` into a folder holding the user's README.md and config.json replaced
    them (exit 0); predict, eval, clusters, report and demo wrote beside the user's files."""
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    error = refused(capsys, *_command(command, trained, data_root, photos, tmp_path, mine))
    assert f"--out {mine} already holds README.md, config.json, data.csv" in error
    assert snapshot(mine) == before


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "demo"])  # demo: tests/test_bad_inputs.py
def test_every_out_folder_takes_a_fresh_folder_and_its_own_output_again(command: str, trained: Path, data_root: Path,
                                                                        photos: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = _command(command, trained, data_root, photos, tmp_path, out)
    assert run(capsys, *argv)[0] == 0
    assert json.loads((out / OUTPUT_MARKER).read_text())["written_by"].startswith("hpseg ")
    assert run(capsys, *argv)[0] == 0  # an earlier output of the same command is written again
    (out / OUTPUT_MARKER).unlink()  # as written by an hpseg from before the marker: recognised by its files
    assert run(capsys, *argv)[0] == 0 and (out / OUTPUT_MARKER).is_file()
    other = next(c for c in COMMANDS if c not in (command, "demo"))
    error = refused(capsys, *_command(other, trained, data_root, photos, tmp_path, out))
    assert f"--out {out} already holds" in error and "output of hpseg" in error


def test_eval_refuses_its_out_folder_before_evaluating(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import hpseg.evaluation.protocol as protocol

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation ran before the --out folder was checked")

    monkeypatch.setattr(protocol, "evaluate_model", never)
    mine = users_folder(tmp_path / "mine")
    assert "already holds" in refused(capsys, "eval", str(trained / "checkpoints" / "last.pt"), "--out", str(mine))


def test_onnx_export_into_a_folder_is_refused_before_the_export(trained: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``export --format onnx --out <existing folder>`` exported for 18-61 s, then failed."""
    pytest.importorskip("onnx")
    import hpseg.inference.segmenter as segmenter

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for an export whose --out is refused")

    monkeypatch.setattr(segmenter, "load", never)
    folder = users_folder(tmp_path / "models")
    before = snapshot(folder)
    error = refused(capsys, "export", str(trained / "checkpoints" / "last.pt"), "--format", "onnx", "--out", str(folder))
    assert f"--out {folder} is a folder" in error and "model.onnx" in error
    own = tmp_path / "model.onnx"
    own.write_bytes(b"the user's own model")
    error = refused(capsys, "export", str(trained / "checkpoints" / "last.pt"), "--format", "onnx", "--out", str(own))
    assert f"--out {own} exists and is not an ONNX model written by" in error
    assert snapshot(folder) == before and own.read_bytes() == b"the user's own model"


def test_a_demo_folder_of_an_earlier_hpseg_is_still_the_demos(tmp_path: Path) -> None:
    from hpseg.cli.demo_folder import LEGACY_MANIFEST, claim_demo_folder

    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / LEGACY_MANIFEST).write_text('{"written_by": "hpseg demo"}')
    claim_demo_folder(out)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER]


# ------------------------------------------------------------------------------------ torchrun, seeds, config


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "abc", "1e300"])
def test_collective_timeout_must_be_positive_finite_seconds(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``HPSEG_COLLECTIVE_TIMEOUT=inf`` raised OverflowError on every rank."""
    monkeypatch.setenv("HPSEG_COLLECTIVE_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"HPSEG_COLLECTIVE_TIMEOUT='{value}': expected a positive, finite number"):
        collective_timeout()


def test_collective_timeout_default_and_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HPSEG_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout().total_seconds() == 600
    monkeypatch.setenv("HPSEG_COLLECTIVE_TIMEOUT", "2.5")
    assert collective_timeout().total_seconds() == 2.5


@pytest.mark.parametrize("seed", [str(2**64), str(2**32), "-1"])
def test_seeds_out_of_range_are_refused_before_training(seed: str, data_root: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``--seeds 18446744073709551616`` (2**64) was a traceback."""
    error = refused(capsys, "train", *tiny_overrides(data_root, tmp_path / "runs", steps=1), "--seeds", "0", seed,
                    "--run-dir", str(tmp_path / "sweep"))
    assert f"--seeds {seed}: out of range, allowed 0 <= seed <= 4294967295" in error
    assert not (tmp_path / "sweep").exists()


def test_seeds_report_folder_is_checked_before_training(data_root: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``train --seeds`` writes RUN_DIR/report/ after all seeds trained: its folder is checked first."""
    mine = users_folder(tmp_path / "sweep" / "report")
    error = refused(capsys, "train", *tiny_overrides(data_root, tmp_path / "runs", steps=1), "--seeds", "0",
                    "--run-dir", str(tmp_path / "sweep"))
    assert f"--out {mine} already holds README.md" in error
    assert not (tmp_path / "sweep" / "seed-0").exists()


def test_train_seed_override_has_the_same_range() -> None:
    assert Config().override([f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    with pytest.raises(ValueError, match="train.seed=18446744073709551616 is out of range: allowed 0 <= train.seed"):
        Config().override([f"train.seed={2**64}"])


@pytest.mark.parametrize(("override", "message"), [
    ("method.extra_clusters=1000000000", "method.extra_clusters=1000000000 is out of range: allowed 0 <= "
                                         "method.extra_clusters <= 2048"),
    ("method.n_classes=1000000000", "method.n_classes=1000000000 is out of range: allowed 1 <= method.n_classes <= 2048"),
    ("data.val_feature_cache=foo", "data.val_feature_cache='foo': expected one of auto, memory, disk, off"),
])
def test_config_keys_are_checked_at_start_up(override: str, message: str, data_root: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``extra_clusters=10**9`` failed without naming the key; ``val_feature_cache=foo`` was refused
    only at the first validation, after training steps ran."""
    error = refused(capsys, "train", *tiny_overrides(data_root, tmp_path / "runs", steps=2), override,
                    "--run-dir", str(tmp_path / "new-run"))
    assert message in error
    assert not (tmp_path / "new-run").exists()


def test_val_feature_cache_settings_still_read() -> None:
    from hpseg.config import val_feature_cache_setting

    for value, setting in [("off", "off"), ("memory", "memory"), ("auto", "auto"), ("Disk", "disk")]:
        assert val_feature_cache_setting(Config().override([f"data.val_feature_cache={value}"]).data.val_feature_cache) \
            == setting


def test_eval_extra_clusters_has_the_configs_range(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(capsys, "eval", str(trained / "checkpoints" / "last.pt"), "--extra-clusters", "1000000000")
    assert "--extra-clusters 1000000000: out of range, allowed 0 <= extra_clusters <= 2048" in error


# ------------------------------------------------------------------------------------ report


def test_report_without_checkpoint_entry_reports_with_a_warning(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A results.json lacking ``checkpoint`` (older or hand-edited) was a KeyError traceback."""
    first = fake_results(0, 0.5)
    del first["checkpoint"]
    a = write_results(tmp_path / "a", first)
    b = write_results(tmp_path / "b", fake_results(1, 0.6))
    status, text = run(capsys, "report", str(a), str(b), "--out", str(tmp_path / "report"))
    assert status == 0, text
    assert f"{a / 'results.json'} has no 'checkpoint' entry" in text  # -q keeps warnings
    assert "55.0 ± 7.1" in (tmp_path / "report" / "report.md").read_text()


def test_report_with_a_validation_record_without_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for seed in (0, 1):
        run_dir = tmp_path / f"run{seed}"
        (run_dir / "checkpoints").mkdir(parents=True)
        log = [{"step": 5, "validation": {"unsupervised_miou": 0.1, "linear_miou": 0.2}}]
        if seed == 1:
            log.append({"validation": {"unsupervised_miou": 0.3}})  # no step
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        paths.append(str(write_results(run_dir / "eval-last", fake_results(seed, 0.5, run=run_dir))))
    status, text = run(capsys, "report", *paths, "--out", str(tmp_path / "report"))
    assert status == 0, text
    assert f"{tmp_path / 'run1' / 'metrics.jsonl'} line 2: a validation record without an integer 'step'" in text
    assert (tmp_path / "report" / "report.md").is_file()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["config"].pop("method"), "no integer 'config.method.n_classes'"),
    (lambda r: r.update(config=[1, 2]), "'config' is not a mapping of sections"),
    (lambda r: r.update(hp=[0.5]), "'hp' is not a mapping of metrics"),
])
def test_report_names_the_file_and_the_missing_entry(edit, message: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    results = fake_results(0, 0.5)
    edit(results)
    bad = write_results(tmp_path / "bad", results)
    error = refused(capsys, "report", str(bad), "--out", str(tmp_path / "report"))
    assert f"{bad / 'results.json'}: {message}" in error


# ------------------------------------------------------------------------------------ clusters


@pytest.mark.parametrize(("options", "message"), [
    (["--k", "2..1000000000000"], "--k '2..1000000000000': K = 1000000000000 needs more than the 2000 patches "
                                  "sampled (--max-patches)"),
    (["--k", "2..50", "--max-patches", "40"], "K = 50 needs more than the 40 patches sampled"),
    (["--k", "10..3"], "--k '10..3': the range is reversed; write LOW..HIGH (3..10)"),
    (["--max-patches", "0"], "--max-patches 0: at least 3 patches are needed"),
    (["--max-images", "-1"], "--max-images -1: must be 0 (all images) or more"),
    (["--k", "2..3..4"], "--k '2..3..4': expected a range LOW..HIGH"),
])
def test_clusters_arguments_are_checked_before_any_work(options: list[str], message: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``--k 2..10**12`` ran out of memory; ``10..3`` said "at least 2"; ``--max-patches 0`` did
    not name the option."""
    error = refused(capsys, "clusters", "vit_tiny_p8", "--random-backbone", "--data-root", str(tmp_path / "none"),
                    *options, "--out", str(tmp_path / "out"))
    assert message in error
    assert not (tmp_path / "out").exists()



# ------------------------------------------------------------------------------------ the app


@pytest.fixture(scope="module")
def segmenter(trained: Path):
    import hpseg

    return hpseg.load(trained / "checkpoints" / "last.pt", device="cpu")


def test_app_downscales_a_huge_upload_and_says_so(segmenter, tmp_path: Path) -> None:
    """An 8000 x 8000 upload took 32-77 s and 4.2 GiB (label map, overlay and PNGs at full size)."""
    from hpseg.cli.app import MAX_SIDE, segment_files

    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, MAX_SIDE + 452, 3), dtype=np.uint8)).save(wide)
    result = segment_files(segmenter, [wide], out_dir=tmp_path / "out")
    assert f"`wide.png`: {MAX_SIDE + 452}×40 downscaled to {MAX_SIDE}×33" in result.message
    assert Image.open(tmp_path / "out" / "wide.overlay.png").size == (MAX_SIDE, 33)
    assert np.array(Image.open(tmp_path / "out" / "wide.labels.png")).shape == (33, MAX_SIDE)


def test_app_names_an_unreadable_upload_without_the_temporary_path(segmenter, tmp_path: Path) -> None:
    from hpseg.cli.app import segment_files

    upload = tmp_path / "gradio" / "3f9c0d2e7a" / "holiday.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"\x89PNG not really")
    message = segment_files(segmenter, [upload], out_dir=tmp_path / "out").message
    assert "`holiday.png`: not a readable image" in message and "3f9c0d2e7a" not in message


def test_app_request_folders_are_removed(tmp_path: Path) -> None:
    """Every request left an ``hpseg-app-*`` folder behind, never removed."""
    from hpseg.cli.app import RequestFolders

    folders = RequestFolders(keep_s=0)
    assert folders.root.name.startswith("hpseg-app-")
    first = folders.new()
    (first / "a.labels.png").write_bytes(b"x")
    os.utime(first, (0, 0))  # long ago: gradio has copied its files
    second = folders.new()
    assert not first.exists() and second.is_dir()
    folders.close()
    assert not folders.root.exists()


def test_app_command_prints_no_gradio_share_hint(segmenter, monkeypatch: pytest.MonkeyPatch) -> None:
    """gradio's "set `share=True` in `launch()`" hint means nothing to a CLI user."""
    gr = pytest.importorskip("gradio")
    from hpseg.cli.app import serve

    launched: dict[str, object] = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    serve(segmenter, port=0, block=True)
    assert launched["quiet"] is True and launched["share"] is False and launched["server_name"] == "127.0.0.1"
