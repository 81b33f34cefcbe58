"""Checkpoint selection rules: best (validation labels), last, unsupervised (label-free criteria)."""

import json

import pytest
import torch

from hpseg.checkpoints.payload import load_checkpoint
from hpseg.checkpoints.runs import selected_checkpoint
from hpseg.checkpoints.store import CheckpointError
from hpseg.cli.main import main
from hpseg.config import Config
from hpseg.training.selection import label_free_scores
from hpseg.training.trainer import train
from tests.helpers import read_jsonl, tiny_config


def test_last_rule_writes_no_label_chosen_checkpoint(data_root, tmp_path):
    """train.selection=last: validation still logs curves, but no best.pt exists for eval or
    predict to pick up; the run folder resolves to last.pt and the results say so."""
    run = train(tiny_config(data_root, tmp_path, extra=["train.selection=last"]), run_dir=tmp_path / "run")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "validation" in r] == [6, 10, 12]  # and at the epoch end (10 steps)
    assert selected_checkpoint(run) == run / "checkpoints" / "last.pt"
    assert main(["eval", str(run), "--no-progress", "--max-images", "2"]) == 0
    report = json.loads((run / "eval-last" / "results.json").read_text())
    assert report["selection_rule"] == "last" and report["labels_used_for_selection"] is False
    assert report["checkpoint"].endswith("last.pt") and report["selection"] == "last step"


def test_best_rule_resolves_to_best(data_root, tmp_path):
    run = train(tiny_config(data_root, tmp_path, steps=6), run_dir=tmp_path / "run")
    assert selected_checkpoint(run) == run / "checkpoints" / "best.pt"
    assert load_checkpoint(run / "checkpoints" / "best.pt").selection_rule == "best"


def test_unsupervised_rule_keeps_the_highest_label_free_score(data_root, tmp_path):
    extra = ["train.selection=unsupervised", "train.unsupervised_criterion=silhouette", "train.val_interval=3"]
    run = train(tiny_config(data_root, tmp_path, extra=extra), run_dir=tmp_path / "run")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "unsupervised.pt"]
    scored = [(r["label_free"]["silhouette"], r["step"]) for r in read_jsonl(run / "metrics.jsonl") if "label_free" in r]
    assert [step for _, step in scored] == [3, 6, 9, 10, 12]  # with the validation steps
    chosen = load_checkpoint(run / "checkpoints" / "unsupervised.pt")
    best_value = max(value for value, _ in scored)
    # ties go to the later step (>=), as for the reference's rule
    assert chosen.step == max(step for value, step in scored if value == best_value)
    assert chosen.kind == "unsupervised" and "no labels" in chosen.selection
    assert chosen.metrics["label_free"]["silhouette"] == pytest.approx(best_value, abs=1e-5)
    assert selected_checkpoint(run) == run / "checkpoints" / "unsupervised.pt"


def test_unsupervised_rule_needs_label_free_crops():
    with pytest.raises(ValueError, match="train.label_free_crops"):
        Config().override(["train.selection=unsupervised", "train.label_free_crops=0"])
    with pytest.raises(ValueError, match="expected one of"):
        Config().override(["train.unsupervised_criterion=loss"])


def test_label_free_scores_by_hand():
    directions = torch.eye(4)[:, :3].T  # 3 orthonormal directions in R^4
    features = directions.repeat_interleave(10, dim=0)  # 30 patches, 10 per direction
    truth = torch.arange(3).repeat_interleave(10)
    good = label_free_scores(features, truth, 3)
    assert good == pytest.approx({"probe_agreement": 1.0, "stability": 1.0, "silhouette": 1.0})
    collapsed = label_free_scores(features, torch.zeros(30, dtype=torch.long), 3)
    assert collapsed["probe_agreement"] == pytest.approx(0.0) and collapsed["silhouette"] == -1.0
    with pytest.raises(ValueError, match="assignments"):
        label_free_scores(features, truth[:5], 3)


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.yaml"):
        selected_checkpoint(tmp_path)
    (tmp_path / "config.yaml").write_text("train:\n  selection: last\n")
    with pytest.raises(CheckpointError, match="last.pt"):
        selected_checkpoint(tmp_path)
