"""A full training step at the paper's scale on a device, through ``train_step_benchmark.py``.

Random ``dino_vits8``, 224 px crops, batch 64, cocostuff27 preset, fp16 AMP, alpha 0.05, from the
backbone and from the feature cache; 16 images (80 crops; batches repeat across epochs),
threshold pools filled to 2048 rows from them (``--full-pools``), loader processes when /dev/shm
allows (else none, and once more without them if they crash); 2 warm-up + 5 timed steps; median
step time, input time, HP loss time (share of the step), peak CUDA memory.

    python benchmarks/gpu_step.py --device cuda --out DIR
    HF_HUB_OFFLINE=1 python benchmarks/gpu_step.py --smoke --device cpu
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time

from common import GIB, HERE, ROOT, fmt, log, python_env, run_check


def _stream(command: list[str], timeout: float) -> tuple[int | None, list[str]]:
    """Run ``command``, echoing its output as it comes; (return code or None on timeout, lines)."""
    lines: list[str] = []
    process = subprocess.Popen(command, cwd=ROOT, env=python_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

    def pump():
        for line in process.stdout:
            lines.append(line.rstrip())
            log("  | " + line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        reader.join(5)
        return None, lines
    reader.join(5)
    return process.returncode, lines

def check(run) -> dict:
    deadline = run.deadline
    # Loader processes pass batches through shared memory (64 crops of 224 px with their photometric
    # views: about 80 MB a batch); a small /dev/shm (containers: often 64 MB) would crash them.
    workers, shm_free = 0, None
    if not run.smoke:
        try:
            shm_free = shutil.disk_usage("/dev/shm").free
        except OSError:
            pass
        workers = 6 if shm_free and shm_free > 4 * GIB else 0
        log(f"  /dev/shm free: {fmt(shm_free and shm_free / GIB, '.1f')} GiB -> {workers} loader processes")
    attempts = []
    while True:
        if run.smoke:
            options = ["--configs", "vit_tiny_p8:32:4", "--images", "4", "--steps", "2", "--warmup", "1",
                       "--threads", "2"]
        else:
            options = ["--configs", "dino_vits8:224:64", "--images", "16", "--steps", "5", "--warmup", "2",
                       "--threads", "8"]
        json_path = run.work / f"step_{workers}.json"
        command = [sys.executable, str(HERE / "train_step_benchmark.py"), *options, "--num-workers", str(workers),
                   "--alphas", "0.05", "--device", "cuda" if run.cuda else "cpu", "--full-pools", "--time-loss",
                   "--work", str(run.work / "step"), "--json", str(json_path)]
        log("  $ " + " ".join(command))
        started = time.perf_counter()
        code, lines = _stream(command, max(10.0, deadline - started))
        attempts.append({"command": " ".join(command), "return_code": code,
                         "seconds": round(time.perf_counter() - started, 1), "output_tail": lines[-30:]})
        if code == 0 and json_path.exists():
            break
        error = "timed out" if code is None else f"return code {code}"
        # A crash with loader processes: once more without them, if the time allows.
        if workers and code is not None and deadline - time.perf_counter() > 1.5 * (time.perf_counter() - started):
            log(f"  failed with {workers} loader processes ({error}): again with none")
            workers = 0
            continue
        return {"status": "failed", "error": error, "attempts": attempts, "shm_free_gib": shm_free and shm_free / GIB}
    data = json.loads(json_path.read_text())
    rows = []
    for r in data["rows"]:
        finite = all(math.isfinite(v) for v in r.get("hp_values", []))
        rows.append({k: r.get(k) for k in ("name", "crop", "batch", "alpha", "mode", "step_s", "min_step_s", "fetch_s",
                                           "loss_s", "cpu_s", "peak_bytes", "growth_bytes", "peak_kind",
                                           "pool_agnostic_rows", "pool_specific_rows", "hp_values", "num_workers")}
                    | {"hp_finite": finite, "peak_gib": r["peak_bytes"] / GIB,
                       "loss_share": (r["loss_s"] / r["step_s"]) if r.get("loss_s") else None})
    failures = [f"{r['mode']}: non-finite HP loss {r['hp_values']}" for r in rows if not r["hp_finite"]]
    return {"command": " ".join(command), "machine": data.get("machine"), "builds": data.get("builds"), "rows": rows,
            "failures": failures, "attempts": attempts, "num_workers": workers,
            "shm_free_gib": shm_free and shm_free / GIB,
            "note": "step = next(inputs) + training_step (with its contrast draw), synchronised; inputs = the fetch part; HP loss = "
                    "the hidden_positive_loss call inside the step (synchronised around it); peak = "
                    "torch.cuda.max_memory_allocated over the steps, after the pools were built"}


def summary(run) -> None:
    rows = run.results.get("rows")
    if not rows:
        return
    log(f"step (train_step_benchmark, median of timed steps, {run.results.get('num_workers')} loader processes; "
        "HP loss = its call inside the step):")
    log("| model | B | alpha | mode | step s | inputs s | HP loss s (share) | peak GiB | HP loss finite |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f" ({100 * r['loss_share']:.0f}%)" if r.get("loss_share") else ""
        log(f"| {r['name']} {r['crop']}px | {r['batch']} | {r['alpha']} | {r['mode']} | {r['step_s']:.3f} | "
            f"{r['fetch_s']:.3f} | {fmt(r.get('loss_s'))}{share} | {r['peak_gib']:.2f} | {r['hp_finite']} |")


if __name__ == "__main__":
    sys.exit(run_check("step", __doc__.split("\n\n")[0], check, summary, deadline=150.0))
