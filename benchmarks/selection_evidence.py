"""Evidence for label-free checkpoint selection (README "Label-free checkpoint selection").

For each data set (synthetic, 6 and 4 classes; texture mosaic of skimage photographs, 5 classes) and
seed, trains HP with the real commands (`hpseg prepare`, `hpseg train`, random `vit_tiny_p8`,
the demo's sizes) validating every 10 steps, at each epoch end (300 steps; 500 on synthetic-4, 4 classes, where HP's validation
peaks mid-run and then eases, the case where choosing a checkpoint matters). Every validation step logs, in metrics.jsonl, the
validation metrics (with labels) and the three label-free criteria (no labels). From these logs:

* the Spearman rank correlation, across the checkpoints of a run, between each criterion and
  the validation mIoU;
* the validation mIoU of the checkpoint each rule picks: `best` (sum of the four validation
  metrics, the reference's rule), `last`, and `unsupervised` with each criterion. A rule's
  checkpoint is the weights at the step it picks, which training evaluates on the whole
  validation set, the same numbers `hpseg eval` gives for it (tests/test_train.py checks that).

    OMP_NUM_THREADS=1 python benchmarks/selection_evidence.py --seeds 0 1 2 3 4 --work /tmp/hpseg-selection --out selection-evidence.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from hpseg.cli.main import main
from hpseg.data import make_synthetic_dataset
from hpseg.data.mosaic import make_texture_mosaic_dataset
from hpseg.training.selection import LABEL_FREE_CRITERIA

# name -> (generator, classes, steps). On synthetic-4 HP's validation peaks mid-run and eases
# (README, "A longer run"): the case where choosing a checkpoint matters.
SETS = {"synthetic-6": (make_synthetic_dataset, 6, 300), "mosaic-5": (make_texture_mosaic_dataset, 5, 300),
        "synthetic-4": (make_synthetic_dataset, 4, 500)}


def settings(n_classes: int, steps: int) -> list[str]:
    return [
        "data.dataset=folder", "data.crop_size=32", "data.val_size=64", "data.num_workers=0",
        f"method.n_classes={n_classes}", "method.dim=32", "method.pool_size=256", "method.renew_interval=20",
        "method.warmup=50", "train.batch_size=16", f"train.max_steps={steps}",
        # 160 crops / 16 = 10 steps an epoch; validation counts within the epoch: every epoch end
        "train.val_interval=10",
        "train.log_interval=25", f"train.checkpoint_interval={steps}", "train.selection=last",
    ]


def train_run(work: Path, name: str, seed: int) -> Path:
    make, n_classes, steps = SETS[name]
    run = work / f"{name}-seed{seed}"
    if (run / "run" / "checkpoints" / "last.pt").exists():
        return run / "run"
    shutil.rmtree(run, ignore_errors=True)
    data = make(run / "data", n_train=32, n_val=24, size=64, n_classes=n_classes, seed=seed)
    common = ["--preset", "cocostuff27", "--data-root", str(data), *settings(n_classes, steps)]
    assert main(["prepare", *common, "--no-progress"]) == 0
    assert main(["train", *common, "--backbone", "vit_tiny_p8", "--random-backbone", "--run-dir", str(run / "run"),
                 "--no-progress", f"train.seed={seed}"]) == 0
    return run / "run"


def analyse(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    val = {r["step"]: r["validation"] for r in records if "validation" in r}
    free = {r["step"]: r["label_free"] for r in records if "label_free" in r}
    steps = sorted(set(val) & set(free))
    miou = np.array([val[s]["unsupervised_miou"] for s in steps])
    out: dict = {"steps": steps, "miou": miou.tolist(), "picked": {}, "spearman": {}}
    # the reference's rule: highest sum of the four metrics, the later step on ties (train.py's >=)
    total = [sum(val[s].values()) for s in steps]
    out["picked"]["best"] = steps[max(range(len(steps)), key=lambda i: (total[i], i))]
    out["picked"]["last"] = steps[-1]
    for criterion in LABEL_FREE_CRITERIA:
        values = np.array([free[s][criterion] for s in steps])
        out["spearman"][criterion] = float(spearmanr(values, miou).statistic)
        out["picked"][f"unsupervised:{criterion}"] = steps[max(range(len(steps)), key=lambda i: (values[i], i))]
    out["picked_miou"] = {rule: val[step]["unsupervised_miou"] for rule, step in out["picked"].items()}
    return out


def table(results: dict) -> str:
    """README's tables: mIoU (%) of the checkpoint each rule picks, and Spearman per criterion."""
    rules = ["best", "last"] + [f"unsupervised:{c}" for c in LABEL_FREE_CRITERIA]
    lines = ["| set / seed | " + " | ".join(r.replace("unsupervised:", "unsup. ") for r in rules) + " | max over checkpoints |",
             "|---" * (len(rules) + 2) + "|"]
    # grouped by set, then seed (runs are made seeds outermost)
    by_set = sorted(results, key=lambda key: (key.split("/")[0], int(key.split("/seed")[1])))
    for key in by_set:
        r = results[key]
        lines.append(f"| {key} | " + " | ".join(f"{100 * r['picked_miou'][rule]:.1f}" for rule in rules)
                     + f" | {100 * max(r['miou']):.1f} |")
    for name in sorted({k.split('/')[0] for k in results}):
        group = [r for k, r in results.items() if k.startswith(name + "/")]
        lines.append(f"| **{name} mean** | " + " | ".join(
            f"**{100 * np.mean([r['picked_miou'][rule] for r in group]):.1f}**" for rule in rules)
            + f" | {100 * np.mean([max(r['miou']) for r in group]):.1f} |")
    lines += ["", "| set | " + " | ".join(f"Spearman, {c}" for c in LABEL_FREE_CRITERIA) + " |",
              "|---" * (len(LABEL_FREE_CRITERIA) + 1) + "|"]
    for name in sorted({k.split('/')[0] for k in results}):
        group = [r for k, r in results.items() if k.startswith(name + "/")]
        cells = []
        for c in LABEL_FREE_CRITERIA:
            values = [r["spearman"][c] for r in group]
            cells.append(f"{np.mean(values):+.2f} ({', '.join(f'{v:+.2f}' for v in values)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--work", type=Path, default=Path("hpseg-selection-runs"))
    parser.add_argument("--out", type=Path, default=Path("selection-evidence.json"))
    parser.add_argument("--table-only", action="store_true", help="print the tables of an earlier --out")
    args = parser.parse_args()
    if args.table_only:
        print(table(json.loads(args.out.read_text())))
        raise SystemExit(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    results = {}
    # seeds outermost: an interrupted run still covers every set
    for seed in args.seeds:
        for name in args.sets:
            started = time.time()
            run = train_run(args.work, name, seed)
            results[f"{name}/seed{seed}"] = {**analyse(run), "wall_seconds": round(time.time() - started, 1)}
            print(name, seed, json.dumps(results[f"{name}/seed{seed}"]["picked_miou"]), flush=True)
            args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
