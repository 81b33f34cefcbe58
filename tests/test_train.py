"""Training end to end on synthetic data with a tiny random ViT (spec §6)."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpseg.checkpoints.payload import load_checkpoint
from hpseg.checkpoints.store import CheckpointError, save_atomic
from hpseg.cli.main import main
from hpseg.config import Config
from hpseg.data import DatasetLayoutError, make_synthetic_dataset
from hpseg.method import HiddenPositiveLoss, LossBackend
from hpseg.training import trainer as trainer_module
from hpseg.training.step import build_learner
from hpseg.training.trainer import (
    NonFiniteLossError,
    Trainer,
    renews_pool_before,
    resume,
    train,
    validates_after,
)
from tests.helpers import read_jsonl, synthetic_prepared, tiny_config, tiny_overrides


def test_train_writes_run_and_checkpoints(data_root, tmp_path):
    run = train(tiny_config(data_root, tmp_path), run_dir=tmp_path / "run")
    records = read_jsonl(run / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    lambdas = [r["lambda"] for r in records if "loss" in r]
    assert lambdas[:4] == [0.0] * 4 and lambdas[-1] == pytest.approx(8 / 9)  # warmup 3 of 12 steps
    # 10 steps per epoch (40 crops, batch 4): every 6 steps within an epoch, at its end, at the last step
    assert [r["step"] for r in records if "validation" in r] == [6, 10, 12]
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert last.kind == "last" and last.step == 12 and best.kind == "best"
    assert "best sum" in best.selection and set(best.metrics) >= {"unsupervised_accuracy", "linear_miou"}
    assert last.config.train.seed == 0 and len(last.class_names) == 4
    assert (run / "config.yaml").exists() and any((run / "tensorboard").iterdir())
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_refuses_to_overwrite_a_run(data_root, tmp_path):
    train(tiny_config(data_root, tmp_path, steps=2), run_dir=tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(data_root, tmp_path, steps=2), run_dir=tmp_path / "run")


def test_ema_follows_and_probes_learn(data_root, tmp_path):
    config = tiny_config(data_root, tmp_path, steps=6, extra=["train.val_interval=100"])
    trainer = Trainer(config, tmp_path / "run")
    (tmp_path / "run").mkdir()
    before = trainer.model.ema_segmentation.linear.weight.detach().clone()
    untrained = copy.deepcopy(trainer.model)
    trainer.fit()
    after = trainer.model.ema_segmentation.linear.weight.detach()
    head = trainer.model.segmentation.linear.weight.detach()
    assert not torch.equal(before, after)
    # m = 0.99: after 6 steps the EMA moved only a little of the way towards S
    assert (after - before).norm() < (head - before).norm()
    # The probes learnt: on the trained head's features of the training crops, the trained probes
    # have a lower loss than the untrained ones.
    inputs = next(trainer._epoch_steps(0, 0))
    with torch.no_grad():
        segmentation = trainer.model.segmentation.eval()(inputs.features)
        for probe in ("linear_probe", "cluster_probe"):
            args = (segmentation, inputs.labels) if probe == "linear_probe" else (segmentation,)
            trained, initial = getattr(trainer.model, probe).loss(*args), getattr(untrained, probe).loss(*args)
            assert trained < initial - 1e-3, probe


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_run_resumes_to_the_same_losses(data_root, tmp_path, monkeypatch, workers):
    """Also with DataLoader workers (the default data.num_workers=2): the photometric view's
    random draws must not depend on where the resumed loader starts."""
    extra = [f"data.num_workers={workers}"]
    reference = train(tiny_config(data_root, tmp_path, extra=extra + ["train.run_name=a"]))
    expected = [r["loss"] for r in read_jsonl(reference / "metrics.jsonl") if "loss" in r]

    original = trainer_module.training_step
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 9:  # crash during step 10; last checkpoint is at step 8
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data_root, tmp_path, extra=extra + ["train.run_name=b"]))
    monkeypatch.setattr(trainer_module, "training_step", original)
    run = tmp_path / "b"
    assert load_checkpoint(run / "checkpoints" / "last.pt").step == 8
    resume(run)
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))  # no repeats, no restart
    torch.testing.assert_close(torch.tensor([r["loss"] for r in records]), torch.tensor(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_prepare_train_kill_resume_eval(tmp_path):
    data = make_synthetic_dataset(tmp_path / "data", n_train=8, n_val=4, size=64, n_classes=4, seed=1)
    overrides = tiny_overrides(data, tmp_path / "runs", steps=40)
    assert main(["prepare", "--preset", "cocostuff27", "--data-root", str(data), "--no-progress",
                 "data.dataset=folder", "data.crop_size=32", "method.n_classes=4"]) == 0
    run = tmp_path / "runs" / "cli"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "hpseg", "train", "--preset", "cocostuff27", "--run-dir", str(run),
               "--no-progress", *overrides, "train.checkpoint_interval=2",
               # validation through the backbone, as eval computes it: the metrics must agree exactly
               # (the float16 validation feature cache agrees to its rounding: tests/test_validation_cache.py)
               "data.val_feature_cache=off"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if last.exists() and load_checkpoint(last).step >= 4:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(last).step
    assert 4 <= killed_at < 40
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    records = read_jsonl(run / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 41))
    assert load_checkpoint(last).step == 40
    assert main(["eval", str(run / "checkpoints" / "best.pt"), "--baseline", "--no-progress"]) == 0
    report = json.loads((run / "eval-best" / "results.json").read_text())
    assert report["checkpoint_kind"] == "best" and report["seed"] == 0 and report["crf"] is False
    assert 0 <= report["hp"]["unsupervised_accuracy"] <= 1 and "baseline" in report
    # evaluation rebuilds the (random) backbone and the heads: it must see what validation saw
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    for key in ("unsupervised_accuracy", "unsupervised_miou", "linear_accuracy", "linear_miou"):
        assert report["hp"][key] == pytest.approx(best.metrics[key], abs=1e-6), key
    assert (run / "eval-best" / "confusion_unsupervised.png").exists()


def test_checkpoint_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    other = save_atomic({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an hpseg checkpoint"):
        load_checkpoint(other)


class Payload:
    """An arbitrary class: loading it would run code a checkpoint should never run."""


def test_checkpoint_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "hpseg-checkpoint", "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_missing_prepared_data_says_what_to_run(tmp_path):
    config = tiny_config(tmp_path / "nowhere", tmp_path)
    with pytest.raises(Exception, match="hpseg prepare"):
        train(config, run_dir=tmp_path / "run")


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    """``hpseg train`` under torchrun (gloo on the CPU): the global batch of 4 split over 2 ranks
    trains the weights one process trains (channel dropout off: its masks differ per rank), rank 0
    alone logs and writes checkpoints (the ranks' agreement is checked at every checkpoint)."""
    data = synthetic_prepared(tmp_path)
    run = tmp_path / "run"
    overrides = [*tiny_overrides(data, tmp_path / "runs", steps=6), "train.device=cpu", "method.dropout=0",
                 "method.similarity_dropout=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hpseg", "train",
               "--preset", "cocostuff27", "--run-dir", str(run), "--no-progress", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run written to") == 1
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 7))
    two = load_checkpoint(run / "checkpoints" / "last.pt")
    assert two.step == 6
    assert main(["--quiet", "train", "--preset", "cocostuff27", "--run-dir", str(tmp_path / "one"), "--no-progress",
                 *overrides]) == 0
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    for key, value in one.model.items():
        assert torch.allclose(two.model[key], value, rtol=1e-4, atol=1e-6), key


def test_pool_renewal_counts_steps_within_the_epoch():
    epoch = [s for s in range(30) if renews_pool_before(s, steps_per_epoch=10, interval=4)]
    assert epoch == [4, 8, 14, 18, 24, 28]  # [ref quirk] the count restarts every epoch
    run = [s for s in range(30) if renews_pool_before(s, steps_per_epoch=10, interval=4, counter="global")]
    assert run == [4, 8, 12, 16, 20, 24, 28]


@pytest.mark.parametrize(("count", "renewals"), [("epoch", 1), ("global", 2)])
def test_trainer_renews_the_pool_on_schedule(data_root, tmp_path, monkeypatch, count, renewals):
    calls = []
    original = Trainer.build_specific_pool
    monkeypatch.setattr(Trainer, "build_specific_pool", lambda self: calls.append(self.state.step) or original(self))
    # 10 steps per epoch, renew_interval 5: "epoch" renews before step 5 only, "global" also before step 10
    train(tiny_config(data_root, tmp_path, extra=["train.val_interval=100", f"method.renew_counter={count}"]),
          run_dir=tmp_path / "run")
    assert calls == [0, 5, 10][: 1 + renewals]


def test_validation_also_at_every_epoch_end():
    # every 4 steps counted within each epoch of 10, at every epoch's end [ref quirk], at the last step
    quirk = [s for s in range(1, 26) if validates_after(s, steps_per_epoch=10, interval=4, total_steps=25)]
    assert quirk == [4, 8, 10, 14, 18, 20, 24, 25]
    interval_only = [s for s in range(1, 26) if validates_after(s, steps_per_epoch=10, interval=4, total_steps=25,
                                                                at_epoch_end=False)]
    assert interval_only == [4, 8, 14, 18, 24, 25]


def test_validation_on_the_interval_only(data_root, tmp_path):
    run = train(tiny_config(data_root, tmp_path, extra=["train.validate_at_epoch_end=false"]), run_dir=tmp_path / "r")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "validation" in r] == [6, 12]


def test_best_is_chosen_among_epoch_end_validations(data_root, tmp_path, monkeypatch):
    scores = {6: 1.0, 10: 3.0, 12: 2.0}  # the epoch-end validation (step 10) is the best
    trainer_module = sys.modules[Trainer.__module__]
    monkeypatch.setattr(trainer_module, "selection_score", lambda results: scores[calls.pop(0)])
    calls = [6, 10, 12]
    run = train(tiny_config(data_root, tmp_path), run_dir=tmp_path / "run")
    assert not calls and load_checkpoint(run / "checkpoints" / "best.pt").step == 10


@pytest.mark.parametrize(("setting", "scale", "interval"), [("reference", 2048.0, 1000), ("pytorch", 65536.0, 2000)])
def test_grad_scaler_settings(data_root, tmp_path, setting, scale, interval):
    config = tiny_config(data_root, tmp_path, extra=[f"train.grad_scaler={setting}"])
    learner = build_learner(config, 64, torch.device("cpu"), torch.float16)  # float16: the scaler is on
    assert learner.scaler.is_enabled() and learner.scaler.get_scale() == scale
    assert learner.scaler.get_growth_interval() == interval
    assert Config().train.grad_scaler == "reference"  # [ref quirk] the default


def test_a_run_computes_its_loss_with_the_backend_its_config_names(data_root, tmp_path, monkeypatch):
    used = []
    original = LossBackend.loss_and_gradients

    def recorded(self, *args, **kwargs):
        used.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LossBackend, "loss_and_gradients", recorded)
    config = tiny_config(data_root, tmp_path, steps=2, extra=["method.loss_backend=torch-dense",
                                                              "train.val_interval=100", "train.label_free_crops=0"])
    train(config, run_dir=tmp_path / "run")
    assert used == ["torch-dense", "torch-dense"]
    benchmark = LossBackend("torch-sparse", compile=False)  # a benchmark's backend replaces the config's
    assert build_learner(config, 64, torch.device("cpu"), None, loss_backend=benchmark).loss.backend is benchmark


def test_missing_validation_split_means_no_validation(data_root, tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise DatasetLayoutError("missing directory (split 'val')", tmp_path / "data" / "val")

    monkeypatch.setattr(sys.modules[Trainer.__module__], "build_raw_dataset", missing)
    assert Trainer(tiny_config(data_root, tmp_path), tmp_path / "run").validation is None


@pytest.mark.parametrize("error", [ValueError("classes.txt lists 3 classes, labels hold 5"),
                                   DatasetLayoutError("empty class list", Path(__file__))])
def test_other_validation_set_problems_stop_training(data_root, tmp_path, monkeypatch, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(sys.modules[Trainer.__module__], "build_raw_dataset", broken)
    with pytest.raises(type(error), match=str(error.args[0])):
        Trainer(tiny_config(data_root, tmp_path), tmp_path / "run")


def nan_loss_from_call(monkeypatch, first_bad: int) -> None:
    """The HP loss returns NaN from its ``first_bad``-th call on (as an overflow would)."""
    original, calls = HiddenPositiveLoss.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= first_bad else loss

    monkeypatch.setattr(HiddenPositiveLoss, "forward", forward)


def test_non_finite_loss_stops_training_with_step_value_and_last_checkpoint(data_root, tmp_path, monkeypatch):
    """A NaN at step 7 stops the run there: the error names the step, the value and last.pt of
    step 4 (checkpoint_interval 4); nothing of step 7 reaches the weights, the log or a checkpoint."""
    nan_loss_from_call(monkeypatch, first_bad=7)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as caught:
        train(tiny_config(data_root, tmp_path, extra=["train.val_interval=100"]), run_dir=run)
    message = str(caught.value)
    assert "step 7: the loss is nan" in message and "hp nan" in message
    assert f"{run / 'checkpoints' / 'last.pt'} (step 4)" in message and f"--resume {run}" in message
    assert load_checkpoint(run / "checkpoints" / "last.pt").step == 4
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == list(range(1, 7))


def test_non_finite_loss_before_any_checkpoint_says_so(data_root, tmp_path, monkeypatch):
    nan_loss_from_call(monkeypatch, first_bad=1)
    config = tiny_config(data_root, tmp_path, steps=3)
    trainer = Trainer(config, tmp_path / "run")
    (tmp_path / "run").mkdir()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="step 1: the loss is nan.*no checkpoint was written"):
        trainer.fit()
    for key, value in trainer.model.state_dict().items():  # the bad step changed no weight (EMA included)
        assert torch.equal(value, weights[key]), key


def test_cli_exits_non_zero_on_a_non_finite_loss(data_root, tmp_path, monkeypatch, capsys):
    nan_loss_from_call(monkeypatch, first_bad=2)
    code = main(["--quiet", "train", "--run-dir", str(tmp_path / "run"),
                 *tiny_overrides(data_root, tmp_path, steps=4)])
    assert code != 0
    assert "step 2: the loss is nan" in capsys.readouterr().err


def test_consistency_is_absent_when_alpha_is_zero(data_root, tmp_path):
    """α = 0: the consistency loss is not computed, so no value (not 0.0) is logged; α > 0 logs it."""
    for alpha, run in ((0.0, tmp_path / "off"), (0.3, tmp_path / "on")):
        train(tiny_config(data_root, tmp_path, steps=2, extra=[f"method.alpha={alpha}"]), run_dir=run)
        records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        assert len(records) == 2
        if alpha:
            assert all(r["consistency"] > 0 for r in records)
        else:
            assert not any("consistency" in r for r in records)
