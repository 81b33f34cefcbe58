"""Where the time of a whole training run goes, measured by the run's own timers.

One ``hpseg train`` run at reduced size on the CPU (a synthetic dataset five-cropped into a
prepared set, a small backbone with random weights, enough steps for several validations and
pool renewals), then the ``timing`` record the training loop writes to ``metrics.jsonl``
(``hpseg.training.timers``): seconds and shares of start-up, the initial pools, waiting for
the data, training steps, pool renewals, validations and checkpoint writes.

    HF_HUB_OFFLINE=1 python benchmarks/whole_run.py --work /tmp/whole_run --json /tmp/whole_run/before.json

``--compare-validation`` then times one validation side by side: today's path (the backbone on
every validation image) and the validation feature cache (built once, then head, probes and
metrics only), on the same trained model, median of ``--repeats``. ``hpseg eval``'s and
``hpseg predict``'s throughput in images per second: ``benchmarks/predict_throughput.py``.
Extra ``key=value`` arguments override the run's config.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hpseg.config import Config
from hpseg.data import build_raw_dataset, make_synthetic_dataset, prepare_five_crops
from hpseg.evaluation.protocol import METRIC_KEYS
from hpseg.training.trainer import train

PHASE_LABELS = {
    "startup": "start-up (backbone, data, model)",
    "initial_pools": "initial threshold pools",
    "data_wait": "step inputs (loader + backbone forward)",
    "loader_wait": "  of which waiting on the loader",
    "step": "training steps",
    "renewal": "pool renewals",
    "validation": "validations",
    "validation_features": "  of which computing the validation features",
    "checkpoint": "checkpoint writes",
    "other": "other (logging, loop)",
}


def prepared_data(work: Path, n_train: int, n_val: int, image_size: int, crop_size: int) -> Path:
    """A synthetic folder dataset with its five-crop training set (made once per settings)."""
    data = work / f"data-{n_train}-{n_val}-{image_size}"
    prepared = data / "hpseg_prepared" / f"train_{crop_size}"
    if not (prepared / "manifest.json").exists():
        make_synthetic_dataset(data, n_train=n_train, n_val=n_val, size=image_size, n_classes=27, seed=0)
        prepare_five_crops(build_raw_dataset("folder", data, "train"), prepared, crop_size=crop_size)
    return data


def run_config(args: argparse.Namespace, data: Path, overrides: list[str]) -> Config:
    return Config().override([
        f"backbone.name={args.backbone}", "backbone.pretrained=false",
        "data.dataset=folder", f"data.root={data}", f"data.crop_size={args.crop}", f"data.val_size={args.val_size}",
        f"data.num_workers={args.workers}",
        f"method.pool_size={args.pool}", f"method.renew_interval={args.interval}", "method.warmup=5",
        f"train.batch_size={args.batch}", f"train.max_steps={args.steps}", f"train.val_interval={args.interval}",
        "train.log_interval=10", f"train.checkpoint_interval={args.interval}", "train.device=cpu",
        *overrides,
    ])


def timing_record(run_dir: Path) -> dict[str, Any]:
    """The last ``timing`` record of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    timings = [r["timing"] for r in records if "timing" in r]
    if not timings:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no timing record: this hpseg's trainer records none")
    return timings[-1]


def print_breakdown(timing: dict[str, Any]) -> None:
    print("| phase | seconds | share | count |\n|---|---|---|---|")
    for name, seconds in timing["seconds"].items():
        count = timing["counts"].get(name, "") if not name.endswith(("_wait", "_features")) else ""
        print(f"| {PHASE_LABELS.get(name, name)} | {seconds:.2f} | {100 * timing['shares'][name]:.1f}% | {count} |")
    print(f"| **total** | {timing['total_s']:.2f} | 100% | |")


def compare_validation(config: Config, run_dir: Path, repeats: int) -> dict[str, Any]:
    """One validation of the trained run's model with the backbone (``off``) and from the validation
    feature cache (in memory), median seconds of ``repeats``; the cache's one-off build time."""
    from hpseg.checkpoints.payload import load_checkpoint
    from hpseg.training.trainer import Trainer

    timings: dict[str, Any] = {}
    for setting in ("off", "memory"):
        trainer = Trainer(config.override([f"data.val_feature_cache={setting}"]), run_dir / f"compare-{setting}")
        trainer.model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt").model)
        start = time.perf_counter()
        first = trainer._evaluate()  # with the cache: builds it
        build = time.perf_counter() - start
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            results = trainer._evaluate()
            seconds.append(time.perf_counter() - start)
        timings[setting] = {"first_s": build, "median_s": statistics.median(seconds), "all_s": seconds,
                            "metrics": {key: results[key] for key in METRIC_KEYS}}
        assert results["linear_confusion"] == first["linear_confusion"]
    off, cached = timings["off"], timings["memory"]
    timings["speedup"] = off["median_s"] / cached["median_s"]
    print(f"one validation ({len(trainer.validation)} images): backbone {off['median_s']:.2f} s, from cached "
          f"features {cached['median_s']:.2f} s ({timings['speedup']:.1f}x; building the features "
          f"{cached['first_s'] - cached['median_s']:.2f} s once)")
    for key in METRIC_KEYS:
        print(f"  {key}: backbone {off['metrics'][key]:.4f}, cached {cached['metrics'][key]:.4f}")
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hpseg_whole_run"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--backbone", default="dino_vits8", help="random weights (backbone.pretrained=false)")
    parser.add_argument("--train-images", type=int, default=48, help="synthetic images; five crops each")
    parser.add_argument("--val-images", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--val-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pool", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=10, help="validation, renewal and checkpoint interval")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare-validation", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    data = prepared_data(args.work, args.train_images, args.val_images, args.image_size, args.crop)
    config = run_config(args, data, args.overrides)
    run_dir = args.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    train(config, run_dir=run_dir)
    wall = time.perf_counter() - started
    timing = timing_record(run_dir)
    print(f"whole run: {args.steps} steps of batch {args.batch}, {args.backbone} at {args.crop} px, "
          f"{args.val_images} validation images at {args.val_size} px, pool {args.pool}, every {args.interval} "
          f"steps; {torch.get_num_threads()} threads, {args.workers} workers; wall {wall:.1f} s")
    print_breakdown(timing)
    results: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "wall_s": wall, "timing": timing, "torch": torch.__version__,
                               "python": sys.version.split()[0]}
    if args.compare_validation:
        results["validation"] = compare_validation(config, run_dir, args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
