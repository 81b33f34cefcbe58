"""HP vs the k-means / linear baseline on the synthetic dataset with the tiny random ViT.

Runs the real commands (`hpseg prepare`, `hpseg train`, `hpseg eval --baseline`) in a work
directory and prints the four numbers of both. Not a test: a few minutes on 2 CPU cores.

    python benchmarks/synthetic_quality.py --steps 400 --work /tmp/hpseg-synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from hpseg.cli.main import main
from hpseg.data import make_synthetic_dataset

SETTINGS = [
    "data.dataset=folder", "data.crop_size=32", "data.val_size=64", "data.num_workers=0",
    "method.n_classes=4", "method.dim=32", "method.pool_size=128", "method.renew_interval=20",
    "train.batch_size=8", "train.val_interval=50", "train.log_interval=25", "train.checkpoint_interval=100",
]


def run(work: Path, steps: int, seed: int, selection: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shutil.rmtree(work, ignore_errors=True)
    data = make_synthetic_dataset(work / "data", n_train=48, n_val=16, size=64, n_classes=4, seed=seed)
    common = ["--preset", "cocostuff27", "--data-root", str(data), *SETTINGS]
    started = time.time()
    assert main(["prepare", *common, "--no-progress"]) == 0
    assert main(["train", *common, "--backbone", "vit_tiny_p8", "--random-backbone", "--run-dir", str(work / "run"),
                 "--no-progress", f"train.max_steps={steps}", f"method.warmup={steps // 6}", f"train.seed={seed}"]) == 0
    checkpoint = work / "run" / "checkpoints" / f"{selection}.pt"
    assert main(["eval", str(checkpoint), "--baseline", "--no-progress", "--out", str(work / "eval")]) == 0
    report = json.loads((work / "eval" / "results.json").read_text())
    report["wall_seconds"] = round(time.time() - started, 1)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--selection", choices=["last", "best"], default="last")
    parser.add_argument("--work", type=Path, default=Path("hpseg-synthetic-run"))
    args = parser.parse_args()
    report = run(args.work, args.steps, args.seed, args.selection)
    print(json.dumps({"hp": report["hp"], "baseline": report["baseline"], "checkpoint": report["checkpoint_kind"],
                      "step": report["step"], "seed": report["seed"], "wall_seconds": report["wall_seconds"]}, indent=2))
