"""The bad-input corpus of issue 14 as tests: every input a user can get wrong gives a one-line
error naming the file or key and the problem (exit 2, no traceback), or the right result; nothing
the user wrote is lost and no partial file is left behind.

Commands run in-process through :func:`hpseg.cli.main.main`; the trained model is the tiny run of
``tests/test_api.py`` (built once per worker). Cases that need a mount (a full disk, a read-only
file system) run as root -- CI does -- and are skipped with the reason otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import hpseg
from hpseg.checkpoints.store import CheckpointError, save_atomic
from hpseg.cli.demo_folder import claim_demo_folder
from hpseg.config import Bounds, Config
from hpseg.files import OUTPUT_MARKER, OutputFolderError, atomic_write
from hpseg.training.run_lock import LOCK_NAME
from tests.helpers import refused, run, snapshot, tiny_overrides

pytestmark = pytest.mark.usefixtures("hpseg_logger")  # main() configures the hpseg logger

# ------------------------------------------------------------------------------------ helpers


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


@pytest.fixture(scope="module")
def trained(tiny_run: Path) -> Path:
    return tiny_run


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A copy of the finished tiny run (resuming it runs no step: fast)."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def train_args(data_root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", *tiny_overrides(data_root, tmp_path / "runs", steps=2), *extra,
            "--run-dir", str(tmp_path / "new-run")]


# ------------------------------------------------------------------------------------ config fields


def _rules() -> list[tuple[str, str, Bounds]]:
    return [(section.name, key, bounds) for section in dataclasses.fields(Config)
            for key, bounds in getattr(section.default_factory(), "RULES", {}).items()]


def _edge_cases() -> list[tuple[str, Any, bool]]:
    """(key, value, allowed) at and beyond every bound of every rule."""
    cases = []
    for section, key, bounds in _rules():
        integer = isinstance(getattr(getattr(Config(), section), key), int)
        step = 1 if integer else 1e-6
        for bound, is_open, outside in ((bounds.low, bounds.low_open, -step), (bounds.high, bounds.high_open, step)):
            if bound is None:
                continue
            value = int(bound) if integer else float(bound)
            cases.append((f"{section}.{key}", value, not is_open))
            cases.append((f"{section}.{key}", value + outside, False))
    return cases


def test_every_numeric_field_has_a_rule() -> None:
    """One place knows each field's range: a new int/float field must say its own."""
    config = Config()
    missing = [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
               for f in dataclasses.fields(getattr(config, section.name))
               if isinstance(getattr(getattr(config, section.name), f.name), (int, float))
               and not isinstance(getattr(getattr(config, section.name), f.name), bool)
               and f.name not in getattr(config, section.name).RULES]
    assert missing == []


@pytest.mark.parametrize(("key", "value", "allowed"), _edge_cases())
def test_every_field_at_and_beyond_its_bounds(key: str, value: Any, allowed: bool) -> None:
    extra = ["train.max_steps=1"] if key == "train.epochs" else []  # epochs=0 alone gives no step
    assignments = [*extra, f"{key}={value}"]
    if allowed:
        assert getattr(getattr(Config().override(assignments), key.split(".")[0]), key.split(".")[1]) == value
    else:
        with pytest.raises(ValueError, match=rf"^{key}=.* is out of range: allowed .*{key}"):
            Config().override(assignments)


@pytest.mark.parametrize(("override", "message"), [
    ("train.batch_size=0", "train.batch_size=0 is out of range: allowed train.batch_size >= 1"),
    ("train.batch_size=-1", "train.batch_size=-1 is out of range"),
    ("method.pool_size=0", "method.pool_size=0 is out of range"),
    ("train.log_interval=0", "train.log_interval=0 is out of range"),
    ("train.val_interval=0", "train.val_interval=0 is out of range"),
    ("method.renew_interval=0", "method.renew_interval=0 is out of range"),
    ("method.n_classes=0", "method.n_classes=0 is out of range"),
    ("method.dim=0", "method.dim=0 is out of range"),
    ("data.val_size=0", "data.val_size=0 is out of range"),
    ("method.tau=0", "method.tau=0.0 is out of range: allowed method.tau > 0"),
    ("method.tau=-1", "method.tau=-1.0 is out of range"),
    ("method.rho=2", "method.rho=2.0 is out of range: allowed 0 < method.rho <= 1"),
    ("method.rho=-0.5", "method.rho=-0.5 is out of range"),
    ("method.ema_momentum=2", "method.ema_momentum=2.0 is out of range: allowed 0 <= method.ema_momentum < 1"),
    ("method.tau=.nan", "method.tau=nan is out of range"),
    ("train.max_steps=-5", "train.max_steps=-5 is out of range"),
    ("train.batch_size=[", "override 'train.batch_size=[': the value '[' is not valid YAML"),
    ("train.batch_size=four", "train.batch_size='four': expected a value of type int"),
    ("train.RULES=1", "unknown config key 'train.RULES'"),
])
def test_bad_config_values_stop_train_naming_the_key(override: str, message: str, data_root: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert message in refused(capsys, *train_args(data_root, tmp_path, override))
    assert not (tmp_path / "new-run").exists()  # stopped before anything was written


def test_zero_training_steps_is_an_error(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(capsys, *train_args(data_root, tmp_path, "train.max_steps=0", "train.epochs=0"))
    assert "train.epochs=0 with train.max_steps=0 gives no training step" in error


def test_a_config_changed_in_python_is_checked_by_train(data_root: Path, tmp_path: Path) -> None:
    config = Config().override(tiny_overrides(data_root, tmp_path, steps=2))
    config.method.tau = 0.0
    with pytest.raises(ValueError, match="method.tau=0.0 is out of range"):
        hpseg.training.trainer.train(config, run_dir=tmp_path / "r")


def test_a_preset_with_a_yaml_syntax_error_names_file_and_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("train:\n  batch_size: 4\nmethod: {dim: [\n")
    error = refused(capsys, "train", "--preset", str(preset))
    assert f"config file {preset} is not valid YAML at line 4" in error


def test_a_preset_with_a_bad_value_names_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("method: {rho: 3}\n")
    assert f"config file {preset}: method.rho=3.0 is out of range" in refused(capsys, "train", "--preset", str(preset))


def test_n_classes_other_than_the_labelled_datas_stops(data_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # The crops' manifest is checked before the validation split (whose classes.txt says 4 as well).
    error = refused(capsys, *train_args(data_root, tmp_path, "method.n_classes=3"))
    assert "method.n_classes=3 but the labelled data has 4 classes" in error
    assert "manifest.json" in error or "classes.txt" in error


# ------------------------------------------------------------------------------------ checkpoints


class Exploit:
    """A pickle that runs code when unpickled: creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _bad_file(kind: str, folder: Path, good: Path) -> Path:
    """A file ``kind`` of bad: text, random bytes, empty, truncated, code-carrying pickle, ..."""
    path = folder / f"{kind}.pt"
    payload = torch.load(good, weights_only=True)
    if kind == "text":
        path.write_text("my notes about the run\n")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "pickle_with_code":
        torch.save({"format": "hpseg-checkpoint", "model": Exploit(folder / "pwned")}, path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps(Exploit(folder / "pwned")))
    elif kind == "tensors_only":
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "no_config":
        payload.pop("config")
        torch.save(payload, path)
    elif kind == "misfit":
        payload["config"]["method"]["dim"] = 8
        torch.save(payload, path)
    elif kind == "newer":
        payload["version"] = 99
        torch.save(payload, path)
    elif kind == "bad_config":
        payload["config"]["method"]["rho"] = 5.0
        torch.save(payload, path)
    return path


KINDS = ["text", "random", "empty", "truncated", "pickle_with_code", "plain_pickle", "tensors_only",
         "no_config", "misfit", "newer", "bad_config"]
#: What the one-line error says about each kind, besides the file's name.
SAYS = {"text": "not a PyTorch checkpoint (it starts with b'my notes", "random": "checkpoint",
        "empty": "not a PyTorch checkpoint (it is empty)",
        "truncated": "not a readable PyTorch checkpoint", "pickle_with_code": "refused to load — it holds Python objects beyond tensors and plain values (found posix.system",
        "plain_pickle": "checkpoint", "tensors_only": "not an hpseg checkpoint",
        "no_config": "no 'config' entry", "misfit": "do not fit", "newer": "newer hpseg",
        "bad_config": "method.rho=5.0 is out of range"}


@pytest.mark.parametrize("command", ["predict", "eval", "load"])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_checkpoints_are_refused_naming_the_file(kind: str, command: str, trained: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad_file(kind, tmp_path, trained / "checkpoints" / "last.pt")
    if command == "load":
        with pytest.raises(CheckpointError, match=str(bad)) as caught:
            hpseg.load(bad, device="cpu")
        message = str(caught.value)
    else:
        image = tmp_path / "in" / "a.png"
        image.parent.mkdir()
        Image.new("RGB", (40, 40)).save(image)
        argv = (["predict", str(image), "--checkpoint", str(bad), "--out", str(tmp_path / "out")]
                if command == "predict" else ["eval", str(bad), "--out", str(tmp_path / "out")])
        message = refused(capsys, *argv)
    assert str(bad) in message and SAYS[kind] in message, message
    assert not (tmp_path / "pwned").exists()  # no code ran
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["text", "pickle_with_code", "no_config", "truncated"])
def test_resume_from_a_bad_last_checkpoint_names_it(kind: str, run_copy: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    last = run_copy / "checkpoints" / "last.pt"
    shutil.move(_bad_file(kind, tmp_path, last), last)
    before = snapshot(run_copy)
    error = refused(capsys, "train", "--resume", str(run_copy))
    assert str(last) in error and SAYS[kind] in error
    assert snapshot(run_copy) == before and not (tmp_path / "pwned").exists()


def test_resume_of_a_checkpoint_without_training_state(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = run_copy / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    payload.pop("training")
    torch.save(payload, last)
    error = refused(capsys, "train", "--resume", str(run_copy))
    assert f"{last} holds no training state" in error
    assert "no run to resume" in refused(capsys, "train", "--resume", str(run_copy / "nothing-here"))


@pytest.mark.parametrize("kind", ["text", "pickle_with_code", "tensors_only"])
@pytest.mark.parametrize("command", ["train", "cache", "demo", "import-checkpoint"])
def test_bad_weights_and_reference_files(command: str, kind: str, trained: Path, data_root: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad_file(kind, tmp_path, trained / "checkpoints" / "last.pt")
    argv = {
        "train": [*train_args(data_root, tmp_path), "--weights", str(bad)],
        "cache": ["cache", *tiny_overrides(data_root, tmp_path / "runs"), "--weights", str(bad),
                  "--out", str(tmp_path / "cache")],
        "demo": ["demo", "--out", str(tmp_path / "demo"), "--weights", str(bad), "--backbone", "vit_tiny_p8"],
        "import-checkpoint": ["import-checkpoint", str(bad), "--out", str(tmp_path / "imported.pt")],
    }[command]
    error = refused(capsys, *argv)
    assert str(bad) in error, error
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "imported.pt").exists()
    assert not (tmp_path / "cache").exists() and not (tmp_path / "new-run" / "checkpoints").exists()


def test_eval_after_the_dataset_moved_says_data_root(run_copy: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    last = run_copy / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=True)
    payload["config"]["data"]["root"] = str(tmp_path / "gone")
    torch.save(payload, last)
    error = refused(capsys, "eval", str(last))
    assert str(last) in error and str(tmp_path / "gone") in error and "--data-root" in error


# ------------------------------------------------------------------------------------ resume, metrics, lock


def test_a_torn_last_metrics_line_is_dropped_on_resume(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = run_copy / "metrics.jsonl"
    records = metrics.read_text()
    with metrics.open("a") as stream:
        stream.write('{"step": 7, "lo')  # the run was killed (or the disk filled) mid-line
    status, text = run(capsys, "train", "--resume", str(run_copy))
    assert status == 0
    assert f"{metrics}: dropped 1 damaged line(s) (line {records.count(chr(10)) + 1}" in text
    after = metrics.read_text()
    assert after.startswith(records)  # the complete records, in their order
    # a resumed run that has nothing left to train only adds its timing record
    assert all('"timing"' in line for line in after[len(records):].splitlines())


def _hold_lock(run_dir: Path) -> subprocess.Popen[str]:
    """Another process holding ``run_dir``'s lock, as a running ``hpseg train`` does."""
    code = ("import sys, time; from hpseg.training.run_lock import run_lock\n"
            f"with run_lock({str(run_dir)!r}):\n    print('locked', flush=True); time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_stale(run_copy: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    holder = _hold_lock(run_copy)
    try:
        before = snapshot(run_copy)
        error = refused(capsys, "train", "--resume", str(run_copy))
        assert f"{run_copy} is being written by another hpseg train (process {holder.pid} on this machine" in error
        assert snapshot(run_copy) == before  # nothing touched, the holder's lock kept
    finally:
        holder.kill()  # kill -9: the lock file stays behind
        holder.wait()
    assert (run_copy / LOCK_NAME).exists()
    status, text = run(capsys, "train", "--resume", str(run_copy))
    assert status == 0 and f"process {holder.pid}, which is no longer running" in text
    assert not (run_copy / LOCK_NAME).exists()  # released at the end


def test_a_lock_from_another_host_is_respected(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_copy / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname() + "-other", "pid": 1}))
    error = refused(capsys, "train", "--resume", str(run_copy))
    assert f"host {socket.gethostname()}-other" in error and f"delete {run_copy / LOCK_NAME}" in error


def test_the_lock_is_released_when_training_fails(data_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, *train_args(data_root, tmp_path, "train.batch_size=64"))  # fewer crops than one batch
    assert not (tmp_path / "new-run" / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ demo


def test_demo_refuses_a_folder_with_the_users_own_run_and_data(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    (out / "run" / "checkpoints").mkdir(parents=True)
    (out / "run" / "checkpoints" / "last.pt").write_bytes(b"weeks of training")
    (out / "data").mkdir()
    (out / "data" / "classes.txt").write_text("sky\nroad\n")
    before = snapshot(out)
    error = refused(capsys, "demo", "--out", str(out))
    assert f"{out} already holds data, run (no {OUTPUT_MARKER} marks it as hpseg demo's)" in error
    assert snapshot(out) == before


def test_demo_replaces_only_what_a_previous_demo_wrote(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    claim_demo_folder(out)
    for entry in ("run", "data"):
        (out / entry).mkdir()
        (out / entry / "file").write_text("from the previous demo")
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own")
    claim_demo_folder(out)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "notes.txt"]
    (out / OUTPUT_MARKER).write_text("{torn")
    with pytest.raises(OutputFolderError, match=f"{out} already holds notes.txt"):
        claim_demo_folder(out)


# ------------------------------------------------------------------------------------ predict


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _predict(capsys: pytest.CaptureFixture[str], trained: Path, out: Path, *inputs: Path | str,
             extra: tuple[str, ...] = ()) -> tuple[int, str]:
    return run(capsys, "predict", *map(str, inputs), "--checkpoint", str(trained / "checkpoints" / "last.pt"),
               "--out", str(out), "--size", "0", "--window", "0", *extra)


def _skipped(out: Path) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in json.loads((out / "predictions.json").read_text())["skipped"]}


def test_predict_skips_and_lists_links_to_nowhere(photos: Path, trained: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (photos / "self.png").symlink_to("self.png")  # a link to itself
    (photos / "sub" / "loop").symlink_to(photos)  # a folder loop
    (photos / "dangling.png").symlink_to(tmp_path / "deleted.png")
    out = tmp_path / "out"
    status, text = _predict(capsys, trained, out, photos)
    assert status == 0
    skipped = _skipped(out)
    assert "symlink loop" in skipped[str(photos / "self.png")]
    assert "broken link" in skipped[str(photos / "dangling.png")]
    assert "already read through another path" in skipped[str(photos / "sub" / "loop")]
    assert sorted(p.relative_to(out).as_posix() for p in (out / "labels").rglob("*.png")) == [
        "labels/a.png", "labels/sub/b.png"]


def test_predict_lists_unreadable_folders(photos: Path, trained: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Permissions do not stop root (CI): the folder's listing fails as it does for a user without access.
    real_scandir, locked = os.scandir, photos / "sub"

    def scandir(path: Any = ".") -> Any:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert _predict(capsys, trained, out, photos)[0] == 0
    assert _skipped(out) == {str(locked): "folder left out: Permission denied"}


@pytest.mark.parametrize(("option", "value"), [("--batch-size", "0"), ("--size", "-1"), ("--window", "-4")])
def test_predict_refuses_bad_sizes_before_loading(option: str, value: str, photos: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(capsys, "predict", str(photos), "--checkpoint", str(tmp_path / "never-read.pt"),
                    "--out", str(tmp_path / "out"), option, value)
    assert f"{option} {value}: must be at least" in error


def test_predict_refuses_an_out_folder_holding_its_inputs(data_root: Path, trained: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "dataset"
    shutil.copytree(data_root / "val", root)
    before = snapshot(root)
    status, text = _predict(capsys, trained, root, root / "images")
    assert status == 2 and f"the input {root / 'images'} lies inside --out {root}" in text
    assert snapshot(root) == before  # the dataset's labels/ untouched


def test_predict_removes_the_temporaries_of_a_killed_run(photos: Path, trained: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    stale = [out / "labels" / "sub" / ".b.png.0123abcd.tmp", out / ".predictions.json.0123abcd.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half an image")
    (out / OUTPUT_MARKER).write_text('{"written_by": "hpseg predict"}')  # the killed run marked its folder first
    assert _predict(capsys, trained, out, photos)[0] == 0
    assert temporaries(out) == []


def test_segment_refuses_float_images_outside_0_1(trained: Path) -> None:
    segmenter = hpseg.load(trained / "checkpoints" / "last.pt", device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], these range over \[0, 255\] \(0..255\?"):
        segmenter.segment(image)
    with pytest.raises(ValueError, match="NaN"):
        segmenter.segment(np.full((24, 24, 3), np.nan, np.float32))
    np.testing.assert_array_equal(segmenter.segment(image / 255.0), segmenter.segment(image.astype(np.uint8)))
    with pytest.raises(ValueError, match="batch_size=0"):
        hpseg.load(trained / "checkpoints" / "last.pt", device="cpu", batch_size=0)


# ------------------------------------------------------------------------------------ full and read-only disks


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (root only: CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _fill(disk: Path) -> None:
    """Write zeros to ``disk`` until it is full."""
    descriptor = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def test_a_full_disk_keeps_the_previous_file_and_names_the_new_one(small_disk: Path) -> None:
    previous = save_atomic({"step": torch.tensor(1)}, small_disk / "last.pt")
    kept = previous.read_bytes()
    _fill(small_disk)
    with pytest.raises(OSError, match=f"No space left on device: '{previous}'"):
        save_atomic({"weights": torch.zeros(100_000)}, previous)
    assert previous.read_bytes() == kept and temporaries(small_disk) == []


def test_predict_onto_a_full_disk(photos: Path, trained: Path, small_disk: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _fill(small_disk)
    out = small_disk / "out"
    status, text = _predict(capsys, trained, out, photos)
    assert status == 2 and "No space left on device" in text and str(out) in text
    assert temporaries(small_disk) == []
    for label in (out / "labels").rglob("*.png") if out.exists() else []:
        Image.open(label).load()  # complete, or not there


def test_predict_into_a_read_only_folder(photos: Path, trained: Path, small_disk: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "out"
    status, text = _predict(capsys, trained, out, photos)
    assert status == 2 and "Read-only file system" in text and str(out) in text


def test_atomic_write_on_a_read_only_folder_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("root writes into a 0555 folder (the read-only mount case covers root)")
        with pytest.raises(PermissionError, match=str(folder)), atomic_write(folder / "x.json", "w") as stream:
            stream.write("{}")
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------ kill -9, then --resume


def test_a_run_killed_at_a_random_moment_resumes_to_the_uninterrupted_result(data_root: Path, tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [*tiny_overrides(data_root, tmp_path / "runs", steps=10), "train.checkpoint_interval=2"]
    assert run(capsys, "train", *overrides, "--run-dir", str(tmp_path / "whole"))[0] == 0
    killed = tmp_path / "killed"
    # One thread, as this process (tests/conftest.py): the same sums in the same order, bit for bit.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "hpseg", "-q", "train", *overrides, "--run-dir", str(killed)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last, deadline = killed / "checkpoints" / "last.pt", time.time() + 300
    while time.time() < deadline and process.poll() is None and not last.exists():
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.0))  # a random moment: between steps, mid-save or mid-log
    assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
    process.kill()
    process.wait()
    assert run(capsys, "train", "--resume", str(killed))[0] == 0
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert resumed["step"] == whole["step"] == 10
    for key, tensor in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], tensor, rtol=0, atol=0, msg=key)
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    assert temporaries(killed) == []
