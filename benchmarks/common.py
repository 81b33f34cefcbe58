"""What the GPU check scripts share: settings, a deadline, timing, result files, loss backends.

Each script (``gpu_golden.py``, ``gpu_loss.py``, ``gpu_step.py``, ``gpu_cli.py``) is one check:
``run_check`` parses the common options (``--device``, ``--out``, ``--smoke``, ``--deadline``),
runs it under its deadline, writes ``OUT/<name>.json`` (also after each case: ``Run.save``) and
prints its summary. ``benchmarks/gpu_check.sh`` runs them one after another on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from hpseg.method import LossBackend

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GIB = 2**30
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def loss_backends() -> dict[str, LossBackend]:
    """The loss's backends the checks compare, by short name (fresh objects: no fallback state carried)."""
    return {
        "auto": LossBackend("auto"),
        "torch": LossBackend("torch"),
        "dense": LossBackend("torch-dense"),
        "sparse": LossBackend("torch-sparse"),
        "eager": LossBackend("torch", compile=False),
    }


def log(message: str = "") -> None:
    print(message, flush=True)


def fmt(value, spec: str = ".3f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none if value is None else str(value)
    return format(value, spec)


def relative_errors(loss, grads, ref_loss, ref_grads) -> tuple[float, float]:
    """|loss - ref| / |ref| and max over z, z_mix of max|grad - ref| / max|ref| (the golden README's measure)."""
    loss_error = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
    grad_error = max(
        float((g.float().cpu() - r.float().cpu()).abs().max()) / max(float(r.float().abs().max()), 1e-30)
        for g, r in zip(grads, ref_grads)
    )
    return loss_error, grad_error


def python_env() -> dict:
    """Environment for child processes: offline, unbuffered, hpseg importable from this checkout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    src = str(ROOT / "src")
    if src not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


class Run:
    """One check's settings, device, output file, deadline and results."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args, self.smoke = name, args, args.smoke
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if args.device == "auto" else args.device)
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_out_"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f"gpu_{name}_work_"))
        self.started = time.perf_counter()
        self.deadline = self.started + args.deadline
        self.results: dict = {"meta": {"argv": sys.argv, "device": str(self.device), "smoke": self.smoke,
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}}

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        path = self.out / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(path)


def timed_runs(run: Run, function, deadline: float, warmup: int = 1, repeats: int = 3, slow_s: float = 3.0) -> dict:
    """Time ``function()`` (synchronised): ``warmup`` untimed calls, then the median of ``repeats``
    (1 if a call takes more than ``slow_s``, fewer if the deadline comes)."""
    first: list[float] = []
    # One more warm-up if the first was slow (compiling, tuning kernels), so the count below reflects a warm call.
    while len(first) < warmup or (len(first) == warmup and warmup and first[-1] > slow_s):
        first.append(_timed_call(run, function))
    if run.cuda:  # the peak of warm calls (Triton's autotuning allocates a 256 MB cache-flush buffer)
        torch.cuda.reset_peak_memory_stats(run.device)
    count = 1 if first and first[-1] > slow_s else repeats
    times: list[float] = []
    for _ in range(count):
        if times and time.perf_counter() + max(times) > deadline:
            break
        times.append(_timed_call(run, function))
    return {"median_s": statistics.median(times), "times_s": [round(t, 5) for t in times],
            "warmup_s": [round(t, 4) for t in first]}


def _timed_call(run: Run, function) -> float:
    run.sync()
    start = time.perf_counter()
    function()
    run.sync()
    return time.perf_counter() - start


def run_check(name: str, description: str, check, summary, add_options=None, deadline: float = 150.0) -> int:
    """Parse the common options (and ``add_options(parser)``'s), run ``check(run) -> dict`` under the
    deadline, save its results, print ``summary(run)``; exit code 1 if it failed or reports failures."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test of this script)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--out", help="output folder (default: $OUT, else a temporary folder)")
    parser.add_argument("--deadline", type=float,
                        help=f"seconds after which no further case starts (default {deadline:.0f}; smoke: twice that)")
    if add_options:
        add_options(parser)
    args = parser.parse_args()
    if args.deadline is None:  # the CPU of a smoke run is slower
        args.deadline = 2 * deadline if args.smoke else deadline
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = Run(name, args)
    log(f"{name}: on {run.device}{' (smoke sizes)' if run.smoke else ''}; out {run.out}; deadline {args.deadline:.0f} s")
    try:
        run.results.update(check(run) or {})
        failed = run.results.get("failures") or run.results.get("status") == "failed"
        run.results["status"] = "failed" if failed else "ok"
    except Exception as error:  # noqa: BLE001 - recorded with its traceback, the summary still printed
        run.results.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        log(f"[{name}] FAILED: {type(error).__name__}: {error}\n{traceback.format_exc()}")
    run.save()
    shutil.rmtree(run.work, ignore_errors=True)
    summary(run)
    log(f"[{name}] {run.results['status']} in {time.perf_counter() - run.started:.1f} s; results {run.out / (name + '.json')}")
    return 0 if run.results["status"] == "ok" else 1
