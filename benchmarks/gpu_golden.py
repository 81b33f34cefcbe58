"""The GHP + LHP loss on the authors' reference values (tests/data/hp_*.npz) on a device.

hpseg with float32, float16 and bfloat16 products, each through the ``auto`` backend and the torch
path with every tile dense and with every tile sparse (``LossBackend`` "torch-dense" /
"torch-sparse"); relative errors of loss and gradients against the golden values and against the
CPU float32 result; the reference-style baseline too (float32 and under fp16 autocast). float32
must meet the golden README's tolerance (1e-3); half precision is reported only.

    python benchmarks/gpu_golden.py --device cuda --out DIR
    HF_HUB_OFFLINE=1 python benchmarks/gpu_golden.py --smoke --device cpu
"""

from __future__ import annotations

import contextlib
import sys
import time

import torch
from common import DTYPES, fmt, log, loss_backends, relative_errors, run_check
from loss_benchmark import hpseg_on_golden
from reference_style_loss import golden_cases, golden_loss

BACKENDS = ("auto", "dense", "sparse")


def golden_rows(run) -> list[dict]:
    """One row per (implementation, dtype, backend, golden file), in order of importance (float32 first)."""
    cases = golden_cases()
    backends = loss_backends()
    cpu = {name: hpseg_on_golden(g, "cpu") for name, g in cases}
    combos = [("hpseg", d, b) for d in DTYPES for b in BACKENDS]
    combos += [("baseline", "fp32", "-"), ("baseline", "autocast-fp16", "-")]
    rows = []
    for impl, dtype_name, backend in combos:
        for name, g in cases:
            row = {"file": name, "impl": impl, "dtype": dtype_name, "backend": backend}
            rows.append(row)
            if time.perf_counter() > run.deadline:
                row["error"] = "skipped: deadline"
                continue
            started = time.perf_counter()
            try:
                if impl == "hpseg":
                    loss, gz, gzm = hpseg_on_golden(g, run.device, DTYPES[dtype_name], backends[backend])
                    row["cpu_loss_err"], row["cpu_grad_err"] = relative_errors(loss, (gz, gzm), cpu[name][0],
                                                                               cpu[name][1:])
                else:
                    autocast = (torch.autocast(run.device.type, dtype=torch.float16) if dtype_name != "fp32"
                                else contextlib.nullcontext())
                    with autocast:
                        loss, gz, gzm = golden_loss(g, run.device)
                row["loss"] = float(loss)
                row["loss_err"], row["grad_err"] = relative_errors(loss, (gz, gzm), g["loss"],
                                                                   (g["grad_z"], g["grad_z_mix"]))
                row["pass_readme_tolerance"] = row["loss_err"] <= 1e-3 and row["grad_err"] <= 1e-3
            except Exception as error:  # noqa: BLE001 - recorded, the other rows still run
                row["error"] = f"{type(error).__name__}: {error}"
            row["seconds"] = round(time.perf_counter() - started, 3)  # the first CUDA calls include compiling
    return rows


def worst_per_combination(rows: list[dict]) -> dict:
    """One entry per (implementation, dtype, backend): the worst errors over the golden files."""
    summary: dict = {}
    for row in rows:
        entry = summary.setdefault(f"{row['impl']} {row['dtype']} {row['backend']}", {
            "loss_err": 0.0, "grad_err": 0.0, "cpu_loss_err": None, "cpu_grad_err": None, "passed": 0, "files": 0,
            "skipped": 0, "errors": []})
        entry["files"] += 1
        if row.get("error", "").startswith("skipped"):
            entry["skipped"] += 1
        elif "error" in row:
            entry["errors"].append(f"{row['file']}: {row['error']}")
        else:
            entry["passed"] += bool(row["pass_readme_tolerance"])
            for key in ("loss_err", "grad_err", "cpu_loss_err", "cpu_grad_err"):
                if key in row:
                    entry[key] = max(entry[key] or 0.0, row[key])
    return summary


def check(run) -> dict:
    rows = golden_rows(run)
    summary = worst_per_combination(rows)
    failures = [key for key, e in summary.items()
                if e["errors"] or (" fp32 " in f" {key} " and e["passed"] < e["files"] - e["skipped"])]
    return {"rows": rows, "summary": summary, "failures": failures,
            "note": "README tolerance: 1e-3 relative on the loss, 1e-3 x max|grad| on the gradients; "
                    "float32 must meet it, half precision is reported only"}


def summary(run) -> None:
    log("golden (worst of the files; rel. error vs golden loss / grads; vs CPU fp32; files within README 1e-3):")
    for key, e in run.results.get("summary", {}).items():
        log(f"  {key:28s} {fmt(e['loss_err'], '.1e')} / {fmt(e['grad_err'], '.1e')}   CPU "
            f"{fmt(e['cpu_loss_err'], '.1e')} / {fmt(e['cpu_grad_err'], '.1e')}   {e['passed']}/{e['files']}"
            + (f" ERRORS {e['errors']}" if e["errors"] else "") + (f" ({e['skipped']} skipped)" if e["skipped"] else ""))


if __name__ == "__main__":
    sys.exit(run_check("golden", __doc__.split("\n\n")[0], check, summary, deadline=90.0))
