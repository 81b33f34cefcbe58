"""`hpseg report`: mean ± std over seeds, refusals, CSV / Markdown / curves; `hpseg train --seeds`."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from hpseg.checkpoints.payload import load_checkpoint
from hpseg.cli.main import main
from hpseg.config import Config
from hpseg.evaluation.report import aggregate, collect_results, config_differences, write_report
from hpseg.training.multi_seed import _train_in_processes, train_command
from tests.helpers import fake_results, synthetic_prepared, tiny_overrides, write_results


def test_mean_std_min_max_by_hand(tmp_path):
    paths = [write_results(tmp_path / f"s{seed}", fake_results(seed, miou)) for seed, miou in ((0, 0.5), (1, 0.6), (2, 0.7))]
    summary = write_report(paths, tmp_path / "report")
    (group,) = summary["groups"]
    row = next(r for r in group["rows"] if r["metric"] == "HP: unsupervised miou")
    # mean 0.6; sample std sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1
    assert row == pytest.approx({"metric": row["metric"], "n": 3, "mean": 0.6, "std": 0.1, "min": 0.5, "max": 0.7})
    assert group["seeds"] == [0, 1, 2] and group["selection_rule"] == "last"
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| HP: unsupervised miou | 60.0 ± 10.0 | 50.0 | 70.0 | 3 |" in markdown
    assert "`train.selection=last`" in markdown and "Seeds: 0, 1, 2" in markdown and "hungarian" in markdown
    csv = (tmp_path / "report" / "report.csv").read_text().splitlines()
    assert '"HP: unsupervised miou",false,last,last,0 1 2,3,0.600000,0.100000,0.500000,0.700000' in csv


def test_crf_on_and_off_are_separate_tables(tmp_path):
    paths = [write_results(tmp_path / f"s{s}{crf}", fake_results(s, 0.5 + s / 10, crf=crf)) for s in (0, 1) for crf in (False, True)]
    summary = aggregate(collect_results(paths))
    assert [g["crf"] for g in summary["groups"]] == [False, True]
    assert all(g["seeds"] == [0, 1] for g in summary["groups"])


def test_refuses_configs_that_differ_beyond_the_seed(tmp_path):
    other = Config().override(["method.dim=64", "train.batch_size=8"])
    paths = [write_results(tmp_path / "a", fake_results(0, 0.5)), write_results(tmp_path / "b", fake_results(1, 0.6, config=other))]
    with pytest.raises(ValueError, match=r"method\.dim: 512, 64; train\.batch_size: 64, 8"):
        aggregate(collect_results(paths))
    assert config_differences([Config().to_dict(), other.to_dict()]) == ["method.dim", "train.batch_size"]


def test_refuses_mixed_rules_and_repeated_seeds(tmp_path):
    mixed = [write_results(tmp_path / "a", fake_results(0, 0.5)), write_results(tmp_path / "b", fake_results(1, 0.6, kind="best"))]
    with pytest.raises(ValueError, match="checkpoint_kind: best, last"):
        aggregate(collect_results(mixed))
    twice = [write_results(tmp_path / "c", fake_results(0, 0.5)), write_results(tmp_path / "d", fake_results(0, 0.6))]
    with pytest.raises(ValueError, match="seed 0 appears"):
        aggregate(collect_results(twice))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no results.json"):
        collect_results([tmp_path / "empty"])


def test_curves_from_each_runs_metrics_log(tmp_path):
    paths = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        (run / "checkpoints").mkdir(parents=True)
        log = [{"step": s, "validation": {"unsupervised_miou": 0.1 * s, "linear_miou": 0.2}} for s in (5, 10)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 3.0}, *log]))
        paths.append(write_results(run / "eval-last", fake_results(seed, 0.5, run=run)))
    summary = write_report([tmp_path / "run0", tmp_path / "run1"], tmp_path / "report")  # run folders: eval-*/ found
    pytest.importorskip("matplotlib")
    assert summary["curves"] and (tmp_path / "report" / "curves.png").stat().st_size > 1000


def test_curves_leave_out_a_torn_last_line(tmp_path):
    """A run killed mid-write (or on a full disk) ends its metrics.jsonl with a partial record:
    the report reads the complete ones instead of failing."""
    from hpseg.evaluation.report import validation_curves

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    record = {"step": 5, "validation": {"unsupervised_miou": 0.5, "linear_miou": 0.25}}
    (run / "metrics.jsonl").write_text(json.dumps(record) + '\n{"step": 6, "valid')
    curves = validation_curves([(run, {"checkpoint": str(run / "checkpoints" / "last.pt"), "seed": 0})])
    assert curves[0]["step"] == [5]
    assert curves[0]["unsupervised_miou"] == [0.5] and curves[0]["linear_miou"] == [0.25]


@pytest.mark.slow
def test_train_seeds_then_report(tmp_path):
    data = synthetic_prepared(tmp_path)
    overrides = tiny_overrides(data, tmp_path / "runs", steps=4) + ["train.selection=last", "train.val_interval=2"]
    sweep = tmp_path / "sweep"
    assert main(["train", "--run-dir", str(sweep), "--seeds", "0", "1", "--no-progress", *overrides]) == 0
    assert (sweep / "seed-0" / "eval-last" / "results.json").exists()
    csv = (sweep / "report" / "report.csv").read_text()
    assert "0 1,2," in csv and (sweep / "report" / "curves.png").exists()
    # the second command of the two: the same table from the sweep folder
    assert main(["report", str(sweep), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.csv").read_text() == csv
    # a finished sweep is not trained again
    assert main(["train", "--run-dir", str(sweep), "--seeds", "0", "1", "--no-progress", "--no-eval", *overrides]) == 0


def test_seeds_in_parallel_processes(tmp_path):
    """The one-process-per-device path: every run gets its own device and config, a failed
    process names its log. Processes here only record their arguments (starting torch twice costs
    a minute on two shared cores); the command itself runs in-process in the test below."""
    recorder = "import sys, pathlib; pathlib.Path(sys.argv[2], 'args').write_text(' '.join(sys.argv[1:]))"
    configs = [Config().override([f"train.seed={seed}"]) for seed in range(3)]
    runs = [tmp_path / f"seed-{seed}" for seed in range(3)]
    _train_in_processes(configs, runs, ["cuda:0", "cuda:1"],
                        command=lambda preset, run, device: [sys.executable, "-c", recorder, str(preset), str(run), device])
    args = [(run / "args").read_text().split() for run in runs]
    assert [a[-1] for a in args[:2]] == ["cuda:0", "cuda:1"] and args[2][-1] in ("cuda:0", "cuda:1")
    assert [Config.from_dict(yaml.safe_load(Path(a[0]).read_text())).train.seed
            for a in args] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="train.log"):
        _train_in_processes(configs[:1], runs[:1], ["cpu"], command=lambda *_: [sys.executable, "-c", "exit(3)"])


def test_train_command_trains_the_seed_on_its_device(tmp_path):
    data = synthetic_prepared(tmp_path)
    config = Config().override(tiny_overrides(data, tmp_path / "runs", steps=2) + ["train.val_interval=100",
                                                                                   "train.seed=5"])
    run = tmp_path / "seed-5"
    run.mkdir()
    (run / "requested-config.yaml").write_text(config.to_yaml())
    command = train_command(run / "requested-config.yaml", run, "cpu")
    assert command[:4] == [sys.executable, "-m", "hpseg", "train"]
    assert main(command[3:]) == 0  # what `python -m hpseg` runs
    saved = load_checkpoint(run / "checkpoints" / "last.pt").config.train
    assert (saved.seed, saved.device) == (5, "cpu")


def test_report_states_where_the_backbone_weights_came_from(tmp_path):
    """A random backbone is not reported as pretrained (the demo's random network is saved to a
    file, with backbone.pretrained=false)."""
    random = Config().override(["backbone.name=vit_tiny_p8", "backbone.pretrained=false",
                                "backbone.weights=/runs/backbone-vit_tiny_p8-random.safetensors"])
    paths = [write_results(tmp_path / f"r{s}", fake_results(s, 0.5, config=random)) for s in (0, 1)]
    markdown = write_report(paths, tmp_path / "random")["markdown"]
    assert "randomly initialised weights, saved in /runs/backbone-vit_tiny_p8-random.safetensors" in markdown
    assert "pretrained" not in markdown.split("\n\n")[1]
    official = [write_results(tmp_path / f"o{s}", {**fake_results(s, 0.5), "backbone_weights": "official"}) for s in (0, 1)]
    assert "(official pretrained weights)" in write_report(official, tmp_path / "official")["markdown"]
    from_file = Config().override(["backbone.weights=/weights/dino.pth"])
    files = [write_results(tmp_path / f"f{s}", fake_results(s, 0.5, config=from_file)) for s in (0, 1)]
    assert "(weights from /weights/dino.pth)" in write_report(files, tmp_path / "file")["markdown"]
