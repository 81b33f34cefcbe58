"""How reliable is `hpseg clusters`' suggested K? (README "How many clusters").

Data with known numbers of classes: the synthetic sets (3, 6, 10 classes) and mosaics of real
photographs' textures from skimage.data (4, 6, 8 classes), three data seeds each, 24 images of
64 px. For each, `hpseg clusters` (K = 2..15, 1,536 patches, no labels read) on

* the raw features of a random `vit_tiny_p8` backbone, and
* HP's segmentation features after training HP on the set (200 steps, the demo's sizes; HP's
  loss never sees K -- only the cluster probe, which does not train the head, gets n_classes),

and counts how often each criterion's suggestion equals the true number of classes, or is
within +-1 of it.

    OMP_NUM_THREADS=1 python benchmarks/cluster_count.py --seeds 0 1 2 --work /tmp/hpseg-clusters --out cluster-count.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from hpseg.cli.main import main
from hpseg.data import make_synthetic_dataset
from hpseg.data.mosaic import make_texture_mosaic_dataset
from hpseg.evaluation.clusters import CRITERIA

SETS = [("synthetic", make_synthetic_dataset, k) for k in (3, 6, 10)] + \
       [("mosaic", make_texture_mosaic_dataset, k) for k in (4, 6, 8)]
K_RANGE = "2..15"


def hp_run(work: Path, data: Path, n_classes: int, seed: int) -> Path:
    run = work / "run"
    if (run / "checkpoints" / "last.pt").exists():
        return run
    common = ["--preset", "cocostuff27", "--data-root", str(data), "data.dataset=folder", "data.crop_size=32",
              "data.val_size=64", "data.num_workers=0", f"method.n_classes={n_classes}", "method.dim=32",
              "method.pool_size=256", "method.renew_interval=20", "method.warmup=50", "train.batch_size=16",
              "train.max_steps=200", "train.val_interval=200", "train.validate_at_epoch_end=false", "train.checkpoint_interval=200",
              "train.selection=last", "train.label_free_crops=0"]
    assert main(["prepare", *common, "--no-progress"]) == 0
    assert main(["train", *common, "--backbone", "vit_tiny_p8", "--random-backbone", "--run-dir", str(run),
                 "--no-progress", f"train.seed={seed}"]) == 0
    return run


def sweep(source: str, data: Path, out: Path, random_backbone: bool) -> dict:
    args = ["clusters", source, "--data-root", str(data), "--k", K_RANGE, "--size", "64", "--out", str(out)]
    assert main(args + (["--random-backbone"] if random_backbone else [])) == 0
    return json.loads((out / "clusters.json").read_text())["suggested_k_by_criterion"]


def summarise(results: list[dict]) -> dict:
    table: dict = {}
    for r in results:
        for criterion, k in r["suggested"].items():
            cell = table.setdefault(r["features"], {}).setdefault(r["set"], {}).setdefault(
                criterion, {"exact": 0, "within_1": 0, "n": 0, "suggested": []})
            cell["n"] += 1
            cell["exact"] += int(k == r["true_k"])
            cell["within_1"] += int(abs(k - r["true_k"]) <= 1)
            cell["suggested"].append(k)
    return table


def table(summary: dict) -> str:
    """README's table: per features and set, each criterion's exact / within-1 hits and its picks."""
    lines = []
    for features, sets in summary.items():
        lines += [f"**{features}** — hits exact / within ±1 of n data seeds (the suggested Ks):", "",
                  "| set (true K) | " + " | ".join(CRITERIA) + " |", "|---" * (len(CRITERIA) + 1) + "|"]
        totals = {c: [0, 0, 0] for c in CRITERIA}
        for name, cells in sets.items():
            row = []
            for c in CRITERIA:
                cell = cells[c]
                totals[c] = [totals[c][0] + cell["exact"], totals[c][1] + cell["within_1"], totals[c][2] + cell["n"]]
                row.append(f"{cell['exact']} / {cell['within_1']} of {cell['n']} ({', '.join(map(str, cell['suggested']))})")
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("| **all** | " + " | ".join(f"**{t[0]} / {t[1]} of {t[2]}**" for t in totals.values()) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("hpseg-cluster-count"))
    parser.add_argument("--out", type=Path, default=Path("cluster-count.json"))
    parser.add_argument("--no-hp", action="store_true", help="random-backbone features only")
    parser.add_argument("--table-only", action="store_true", help="print the table of an earlier --out")
    args = parser.parse_args()
    if args.table_only:
        print(table(json.loads(args.out.read_text())["summary"]))
        raise SystemExit(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    results = []
    # seeds outermost: an interrupted run still covers every set
    for seed in args.seeds:
        for name, make, n_classes in SETS:
            work = args.work / f"{name}-{n_classes}-seed{seed}"
            data = work / "data"
            if not (data / "classes.txt").exists():
                shutil.rmtree(work, ignore_errors=True)
                make(data, n_train=24, n_val=8, size=64, n_classes=n_classes, seed=seed)
            started = time.time()
            entry = {"set": f"{name}-{n_classes}", "true_k": n_classes, "seed": seed}
            results.append({**entry, "features": "random vit_tiny_p8",
                            "suggested": sweep("vit_tiny_p8", data, work / "clusters-random", True)})
            if not args.no_hp:
                run = hp_run(work, data, n_classes, seed)
                results.append({**entry, "features": "HP head (200 steps)",
                                "suggested": sweep(str(run), data, work / "clusters-hp", False)})
            print(name, n_classes, seed, [r["suggested"] for r in results[-2:]], round(time.time() - started, 1),
                  flush=True)
            args.out.write_text(json.dumps({"runs": results, "summary": summarise(results),
                                            "criteria": list(CRITERIA)}, indent=1))
    print(table(summarise(results)))
