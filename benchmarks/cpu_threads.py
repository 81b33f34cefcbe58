"""``hpseg train`` steps per second on the CPU: torch's old default threads, one thread and the
new default (issue 24), side by side in one run.

Each setting runs the same short ``hpseg train`` of a tiny config (random ``vit_tiny_p8``,
synthetic folder dataset, ``data.num_workers`` loader workers, no validation) as a fresh
command, in alternating order, ``--repeats`` times; the minimum wall time of each is reported
(the machine is shared: the minimum is the run least disturbed by others), with the steps per
second it means and the load average before and after.

* ``old default``: ``--threads T`` with T = torch's own default on this machine
  (``torch.get_num_threads()`` of a fresh process), what ``hpseg train`` used before;
* ``one thread``: ``--threads 1`` (same as ``OMP_NUM_THREADS=1``);
* ``new default``: no flag: the cores available to the process less the loader's workers.

    python benchmarks/cpu_threads.py                  # 24 steps, 2 loader workers, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpseg.data import build_raw_dataset, make_synthetic_dataset, prepare_five_crops
from hpseg.runtime import available_cores, choose_threads

ROOT = Path(__file__).resolve().parents[1]


def torch_default_threads(env: dict[str, str]) -> int:
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout)


def train_seconds(data: Path, runs: Path, steps: int, workers: int, flag: list[str], env: dict[str, str]) -> float:
    overrides = [
        "backbone.name=vit_tiny_p8", "backbone.pretrained=false", "data.dataset=folder", f"data.root={data}",
        "data.crop_size=32", "data.val_size=32", f"data.num_workers={workers}", "method.dim=16", "method.n_classes=4",
        "method.pool_size=32", "method.warmup=3", "method.renew_interval=5", "train.batch_size=4",
        f"train.max_steps={steps}", f"train.val_interval={10 * steps}", "train.validate_at_epoch_end=false",
        f"train.checkpoint_interval={steps}", f"train.output_dir={runs}", "train.selection=last",
    ]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hpseg", "train", "--quiet", *flag, *overrides], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--num-workers", type=int, default=2, help="data.num_workers (default 2, the config's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    work = Path(tempfile.mkdtemp(prefix="cpu_threads_"))
    data = make_synthetic_dataset(work / "data", n_train=16, n_val=4, size=64, n_classes=4, seed=0)
    prepare_five_crops(build_raw_dataset("folder", data, "train"), data / "hpseg_prepared" / "train_32", crop_size=32)
    old = torch_default_threads(env)
    new, reason = choose_threads(args.num_workers)
    settings = {f"old default ({old} threads)": ["--threads", str(old)], "one thread": ["--threads", "1"],
                f"new default ({new} thread(s): {reason})": []}
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for repeat in range(args.repeats):
        for name in settings if repeat % 2 == 0 else reversed(list(settings)):
            seconds[name].append(train_seconds(data, work / "runs", args.steps, args.num_workers, settings[name], env))
    load_after = os.getloadavg()
    rows = [{"setting": name, "seconds": round(min(times), 2), "all_seconds": [round(t, 2) for t in times],
             "steps_per_s": round(args.steps / min(times), 3)} for name, times in seconds.items()]
    print(f"hpseg train, {args.steps} steps of a tiny config, {args.num_workers} loader workers; {os.cpu_count()} cores, "
          f"{available_cores()} available; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print("setting                                              seconds (min)  steps/s  all runs")
    for row in rows:
        print(f"{row['setting']:<52} {row['seconds']:13.2f}  {row['steps_per_s']:7.3f}  {row['all_seconds']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "steps": args.steps, "num_workers": args.num_workers,
                                              "load_average_before_after": [load_before[0], load_after[0]]}, indent=1))


if __name__ == "__main__":
    main()
