"""One prepared run of hpseg's GPU checks and benchmarks, section by section.

Entry point on the GPU machine: ``bash benchmarks/gpu_check.sh [sections]`` (prints the machine,
installs the package, then runs this script). Directly:

    python benchmarks/gpu_benchmark.py --device cuda --out DIR                 # every section
    python benchmarks/gpu_benchmark.py --device cuda --sections loss,step      # a rerun of two
    HF_HUB_OFFLINE=1 python benchmarks/gpu_benchmark.py --smoke --device cpu   # CPU smoke test, tiny sizes

Sections (each runs inside its own try/except: a failure is logged with its traceback and the run
goes on; each has a time budget and the run a global deadline, ``--deadline``):

- ``env``: device, capability, memory, versions; the card's ceilings measured once: 8192^3
  matrix products in bf16, fp16, tf32 and plain fp32 (random data, median of 10 after warm-up,
  CUDA events) in TFLOP/s next to the H100/H200 SXM datasheet peaks, and a device copy in GB/s.
- ``pytest``: the test suite on this machine (``pytest -n 8 -rs``, ``timeout 150``), output in
  ``OUT/pytest.txt``; runs in the background while ``cli`` and ``golden`` (untimed) run, and is
  waited for before the timed sections. The 3 tests needing pydensecrf skip cleanly
  (``pytest.importorskip``: checked with the package made unimportable), so nothing is deselected;
  without the ``hypothesis`` package a stub module makes its property tests skip instead of
  breaking the collection of tests/test_metrics.py (which holds the CUDA-only test). Outcomes per
  test from a JUnit XML report. Not run on the CPU unless ``--pytest-on-cpu``: the command is printed.
- ``cli``: end to end through the real command line (``python -m hpseg``) on a synthetic dataset
  with a random ``vit_tiny_p8``: demo, prepare, train with fp16 and with bf16 AMP, cache + train
  from it, eval, predict on two images, ``hpseg.load(...).segment`` in Python; outputs, finite
  losses and devices checked; every command's output in ``OUT/cli.txt``.
- ``golden``: the GHP + LHP loss on the authors' reference values (tests/data/hp_*.npz) on the
  device: float32, float16 and bfloat16 products, each with the default kernel choice and with
  ``losses.SPARSE_DENSITY_LIMIT`` forced to -1 (all tiles dense) and 2 (all sparse); relative
  errors of loss and gradients against the golden values and against the CPU float32 result;
  the reference-style baseline too (float32 and autocast fp16).
- ``loss``: forward + backward of the loss at 28 x 28 patches, D = 512, C = 384, pool 2048,
  rho 0.02, lambda 0.5, tau 0.8, batches 8-64 (``loss_benchmark.synthetic_inputs``): the
  reference-style baseline in float32 and under fp16 autocast, hpseg with float32 / float16 /
  bfloat16 products (as the trainer passes ``matmul_dtype`` under AMP), each with the default kernel
  choice (on CUDA under half precision: the fused Triton kernels), the torch path
  (``TRITON_KERNELS`` off), and on the torch path all tiles dense, all sparse and its compiled CUDA
  helpers off. The comparison cases run first for every batch, the kernel variants after, so a short budget
  drops variants rather than batches. Median time (1 warm-up, median of 3; 1 if a call takes > 3 s),
  peak CUDA memory over the memory before the call (net) and absolute; FLOPs of the products
  (FlopCounterMode for the dense ones, the sampled pairs for the sparse kernels, counted analytically
  for the Triton kernels: ``triton_loss_flops``) and the achieved
  TFLOP/s against the measured ceiling; speed-up and memory ratios baseline / hpseg. Cases whose
  time, predicted from the previous batch (~ batch^2), passes ``--max-case-s`` or the time left are
  skipped and listed; CUDA out-of-memory is recorded as OOM.
- ``step``: a full training step at the paper's scale through ``train_step_benchmark.py``:
  random ``dino_vits8``, 224 px crops, batch 64, cocostuff27 preset, fp16 AMP, alpha 0.05, from
  the backbone and from the feature cache; 16 images (80 crops; batches repeat across epochs),
  reference pools filled to 2048 rows from them (``--full-pools``), loader processes when /dev/shm
  allows (else none); 2 warm-up + 5 timed steps; median step time, input time, HP loss time
  (share of the step), peak CUDA memory.

At the end a summary is printed (the last ~60 lines) and everything goes to
``OUT/gpu_results.json`` (written after every section too). ``OUT`` is ``--out``, else ``$OUT``,
else a temporary folder. At most four files are written there: gpu_results.json, pytest.txt,
cli.txt and (by the shell script) gpu_log.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SECTIONS = ("env", "pytest", "cli", "golden", "loss", "step")
# Seconds per section (GPU run); the smoke run on the CPU has its own, larger ones (slower machine).
BUDGETS = {"env": 45, "pytest": 150, "cli": 150, "golden": 90, "loss": 160, "step": 150}
SMOKE_BUDGETS = {"env": 60, "pytest": 600, "cli": 300, "golden": 120, "loss": 120, "step": 300}
# Seconds kept back for the later sections when an earlier one gets its budget (GPU run).
RESERVES = {"golden": 20, "loss": 60, "step": 90}
# Datasheet dense peaks of the H100 / H200 SXM (TFLOP/s; the H200 has the H100's compute).
DATASHEET_TFLOPS = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
GIB = 2**30


# ------------------------------------------------------------------------------------ helpers


class Run:
    """Settings, output files, deadline and results of this run."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.torch = torch
        self.smoke = args.smoke
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if args.device == "auto" else args.device)
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_out_"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
        self.started = time.perf_counter()
        self.deadline = self.started + args.deadline
        self.budgets = SMOKE_BUDGETS if self.smoke else BUDGETS
        self.results: dict = {"meta": {"argv": sys.argv, "device": str(self.device), "smoke": self.smoke,
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, "sections": {}}
        self.ceilings: dict = {}
        self.pytest_job: dict | None = None

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def python_env(self) -> dict:
        """Environment for child processes: offline, unbuffered, hpseg importable."""
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        src = str(ROOT / "src")
        if src not in env.get("PYTHONPATH", "").split(os.pathsep):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        return env

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        path = self.out / "gpu_results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(path)


def log(message: str = "") -> None:
    print(message, flush=True)


def run_section(run: Run, name: str, function, later: list[str]) -> None:
    reserve = 0 if run.smoke else sum(RESERVES.get(s, 0) for s in later)
    budget = min(run.budgets[name], run.remaining() - reserve)
    record = {"status": "running", "budget_s": round(budget, 1)}
    run.results["sections"][name] = record
    log(f"\n========== section {name} (budget {budget:.0f} s, {run.remaining():.0f} s left overall) ==========")
    started = time.perf_counter()
    if budget < 5:
        record.update(status="skipped", note="global deadline reached")
        log(f"[{name}] skipped: the global deadline (--deadline) is reached")
    else:
        try:
            data = function(run, started + budget)
            record.update(data or {})
            if record.get("status") == "running":
                record["status"] = "failed" if record.get("failures") else "ok"
        except Exception as error:  # noqa: BLE001 - a failed section must not stop the others
            record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
            log(f"[{name}] FAILED: {type(error).__name__}: {error}\n{traceback.format_exc()}")
    record["elapsed_s"] = round(time.perf_counter() - started, 1)
    log(f"[{name}] {record['status']} in {record['elapsed_s']:.1f} s")
    run.save()


def timed_runs(run: Run, function, deadline: float, warmup: int = 1, repeats: int = 3, slow_s: float = 3.0) -> dict:
    """Time ``function()`` (synchronised): ``warmup`` untimed calls, then the median of ``repeats``
    (1 if a call takes more than ``slow_s``, fewer if the deadline comes)."""
    first = []
    # One more warm-up if the first was slow (compiling, tuning kernels), so the count below reflects a warm call.
    while len(first) < warmup or (len(first) == warmup and warmup and first[-1] > slow_s):
        run.sync()
        start = time.perf_counter()
        function()
        run.sync()
        first.append(time.perf_counter() - start)
    if run.cuda:  # the peak of warm calls (Triton's autotuning allocates a 256 MB cache-flush buffer)
        run.torch.cuda.reset_peak_memory_stats(run.device)
    last = first[-1] if first else 0.0
    count = 1 if last > slow_s else repeats
    times = []
    for _ in range(count):
        if times and time.perf_counter() + max(times) > deadline:
            break
        run.sync()
        start = time.perf_counter()
        function()
        run.sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": [round(t, 5) for t in times],
            "warmup_s": [round(t, 4) for t in first]}


def fmt(value, spec: str = ".3f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none if value is None else str(value)
    return format(value, spec)


def relative_errors(loss, grads, ref_loss, ref_grads) -> tuple[float, float]:
    """|loss - ref| / |ref| and max over z, z_mix of max|grad - ref| / max|ref| (README's measure)."""
    loss_error = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
    grad_error = max(
        float((g.float().cpu() - r.float().cpu()).abs().max()) / max(float(r.float().abs().max()), 1e-30)
        for g, r in zip(grads, ref_grads)
    )
    return loss_error, grad_error


@contextlib.contextmanager
def loss_settings(**settings):
    """Temporarily set module attributes of hpseg.method.losses (SPARSE_DENSITY_LIMIT, ...)."""
    import hpseg.method.losses as losses

    saved = {}
    try:
        for key, value in settings.items():
            if key == "fused":
                fused = getattr(losses, "_FusedOnCuda", None)
                if fused is None:
                    raise AttributeError("hpseg.method.losses has no _FusedOnCuda switch")
                saved[key] = fused.enabled
                fused.enabled = value
            else:
                if not hasattr(losses, key):
                    raise AttributeError(f"hpseg.method.losses has no {key}")
                saved[key] = getattr(losses, key)
                setattr(losses, key, value)
        yield
    finally:
        for key, value in saved.items():
            if key == "fused":
                losses._FusedOnCuda.enabled = value
            else:
                setattr(losses, key, value)


def hpseg_variants() -> dict:
    """Kernel choices of the loss to compare: name -> loss_settings(...) arguments."""
    import hpseg.method.losses as losses

    variants = {"auto": {}}
    torch_path = {}  # the kernel variants below are variants of the torch path
    if hasattr(losses, "TRITON_KERNELS"):
        variants["torch"] = torch_path = {"TRITON_KERNELS": False}
    if hasattr(losses, "SPARSE_DENSITY_LIMIT"):
        variants["dense"] = {**torch_path, "SPARSE_DENSITY_LIMIT": -1.0}
        variants["sparse"] = {**torch_path, "SPARSE_DENSITY_LIMIT": 2.0}
    if hasattr(losses, "_FusedOnCuda"):
        variants["eager"] = {**torch_path, "fused": False}
    return variants


def triton_loss_flops(n: int, feature_dim: int, dim: int, lmbd: float) -> float:
    """FLOPs of the products of the loss's Triton path: each kernel computes, for every ordered pair,
    the similarities of f and (with lambda != 0) s' and the logits of z and z_mix; then G @ e for both."""
    per_pair = 2 * (feature_dim + (dim if lmbd else 0) + 2 * dim) + 2 * dim
    return 2.0 * n * n * per_pair


def uses_triton(device_type: str, dtype_name: str, setting: dict) -> bool:
    import hpseg.method.losses as losses

    try:
        from hpseg.method import triton_kernels as kernels
    except ImportError:  # an hpseg without the kernels
        return False
    return (device_type == "cuda" and dtype_name in ("fp16", "bf16") and kernels.AVAILABLE
            and setting.get("TRITON_KERNELS", losses.TRITON_KERNELS) and not losses._triton_failed)


# ------------------------------------------------------------------------------------ env


def matmul_tflops(run: Run, dtype, size: int, tf32: bool, repeats: int = 10) -> float:
    torch = run.torch
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(size, size, device=run.device, dtype=dtype)
        b = torch.randn(size, size, device=run.device, dtype=dtype)
        for _ in range(3):
            a @ b
        run.sync()
        times = []
        for _ in range(repeats):
            if run.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t)
        return 2 * size**3 / statistics.median(times) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def measure_ceilings(run: Run, deadline: float) -> dict:
    """Matrix-product rates of the device in bf16, fp16, tf32 and plain fp32 (TFLOP/s), into run.ceilings."""
    import torch

    size = 512 if run.smoke else 8192
    for label, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                               ("tf32", torch.float32, True), ("fp32", torch.float32, False)):
        if time.perf_counter() > deadline:
            break
        run.ceilings[label] = matmul_tflops(run, dtype, size, tf32)
        log(f"  matmul {size}^3 {label}: {run.ceilings[label]:.4g} TFLOP/s (datasheet H100/H200 SXM "
            f"{DATASHEET_TFLOPS[label]:.0f})")
    return run.ceilings


def section_env(run: Run, deadline: float) -> dict:
    import timm
    import torch

    info = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "cuda_runtime": torch.version.cuda, "cpu_count": os.cpu_count(), "device": str(run.device)}
    try:
        import hpseg

        info["hpseg"] = f"{hpseg.__version__} at {Path(hpseg.__file__).parent}"
    except Exception as error:  # noqa: BLE001
        info["hpseg"] = f"not importable: {error}"
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        info.update(name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(run.device))),
                    memory_gib=round(props.total_memory / GIB, 1), multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    else:
        info["name"] = platform.processor() or platform.machine()
    log("  " + ", ".join(f"{k} {v}" for k, v in info.items()))

    measure_ceilings(run, deadline)
    copy = None
    if run.cuda:
        x = torch.randn(2**29, device=run.device)  # 2 GiB of float32
        y = torch.empty_like(x)
        y.copy_(x)
        run.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(5):
            start.record()
            y.copy_(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        copy = round(2 * x.numel() * 4 / statistics.median(times) / 1e9, 1)
        log(f"  device copy 2 GiB: {copy:.0f} GB/s (bytes read + written)")
        del x, y
        torch.cuda.empty_cache()
    note = "ceilings on the CPU (smoke run: 512^3, not meaningful)" if run.smoke else "8192^3, median of 10, CUDA events"
    return {"info": info, "matmul_tflops": run.ceilings, "matmul_note": note, "datasheet_tflops": DATASHEET_TFLOPS,
            "copy_gb_s": copy}


# ------------------------------------------------------------------------------------ pytest

HYPOTHESIS_STUB = '''"""Stand-in for a missing hypothesis package (gpu_benchmark.py): property tests skip."""
import pytest


def given(*args, **kwargs):
    def decorate(test):
        def skipped():
            pytest.skip("hypothesis is not installed on this machine: property test not run")
        skipped.__name__, skipped.__qualname__ = test.__name__, test.__qualname__
        skipped.__module__, skipped.__doc__ = test.__module__, test.__doc__
        return skipped
    return decorate


def settings(*args, **kwargs):
    return lambda test: test
'''
HYPOTHESIS_STRATEGIES_STUB = '''class _Strategy:
    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        return self


def __getattr__(name):
    return _Strategy()
'''


def pytest_command(run: Run) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-n", str(run.args.pytest_workers), "-rs", "-p", "no:cacheprovider",
               "--durations=10", f"--junitxml={run.work / 'junit.xml'}"]
    if shutil.which("timeout"):
        command = ["timeout", "-k", "10", str(run.args.pytest_timeout), *command]
    return command


def section_pytest_start(run: Run, deadline: float) -> dict:
    command = pytest_command(run)
    printable = " ".join(command)
    if not run.cuda and not run.args.pytest_on_cpu:
        log(f"  not run on the CPU (--pytest-on-cpu runs it); the GPU run uses:\n  {printable}")
        return {"status": "skipped", "command": printable, "note": "CPU run: not run"}
    env = run.python_env()
    notes = []
    probe = subprocess.run([sys.executable, "-c", "import hypothesis"], env=env, capture_output=True)
    if probe.returncode != 0:
        stub = run.work / "hypothesis_stub" / "hypothesis"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text(HYPOTHESIS_STUB)
        (stub / "strategies.py").write_text(HYPOTHESIS_STRATEGIES_STUB)
        env["PYTHONPATH"] = os.pathsep.join([str(stub.parent), env["PYTHONPATH"]])
        command = [*command, "-p", "no:hypothesispytest"]  # hypothesis's own pytest plugin, if left behind
        printable = " ".join(command)
        notes.append("hypothesis missing: a stub module makes the property tests of tests/test_metrics.py skip")
    probe = subprocess.run([sys.executable, "-c", "import pydensecrf.densecrf"], env=env, capture_output=True)
    if probe.returncode != 0:
        notes.append("pydensecrf missing: the 3 CRF refinement tests skip (pytest.importorskip)")
    for note in notes:
        log(f"  note: {note}")
    log(f"  {printable}  (in the background; output in {run.out / 'pytest.txt'})")
    stream = open(run.out / "pytest.txt", "w")  # noqa: SIM115 - closed when the job is collected
    stream.write(f"$ {printable}\n# {'; '.join(notes) or 'no notes'}\n")
    stream.flush()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT)
    run.pytest_job = {"process": process, "stream": stream, "started": time.perf_counter(), "command": printable,
                      "notes": notes}
    if run.args.pytest_foreground:
        run.results["sections"]["pytest"].update(status="started")
        return finish_pytest(run)
    return {"status": "started", "command": printable, "notes": notes}


def finish_pytest(run: Run) -> dict:
    """Wait for the background pytest job and record its outcome in the pytest section."""
    job, run.pytest_job = run.pytest_job, None
    if job is None:
        return {}
    record = run.results["sections"]["pytest"]
    log(f"\n[pytest] waiting for the test run (started {time.perf_counter() - job['started']:.0f} s ago)")
    try:
        job["process"].wait(timeout=max(5.0, run.args.pytest_timeout + 20 - (time.perf_counter() - job["started"])))
    except subprocess.TimeoutExpired:
        job["process"].kill()
        job["process"].wait()
    job["stream"].close()
    wall = time.perf_counter() - job["started"]
    text = (run.out / "pytest.txt").read_text(errors="replace")
    result = {"returncode": job["process"].returncode, "wall_s": round(wall, 1), "command": job["command"],
              "notes": job["notes"], "timed_out": job["process"].returncode in (124, 137, -9)}
    summary = [line for line in text.splitlines() if (" passed" in line or " failed" in line or " error" in line)
               and " in " in line]
    result["summary_line"] = summary[-1].strip("= ") if summary else None
    junit = run.work / "junit.xml"
    if junit.exists():
        counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        failures, skips, cuda_test = [], [], None
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
                    message = (child.get("message") or "")[:300]
                    (skips if outcome == "skipped" else failures).append(f"{name}: {message}")
                    break
            counts[outcome] += 1
            if case.get("name") == "test_cuda_confusion_matches_cpu":
                cuda_test = outcome
        result.update(counts=counts, failures=failures, skipped=skips, cuda_test=cuda_test)
    status = "ok" if result["returncode"] == 0 else "failed"
    record.update(result, status=status, elapsed_s=round(wall, 1))
    log(f"[pytest] {status}: {result['summary_line']} (wall {wall:.0f} s, return code {result['returncode']})")
    for line in result.get("failures", []):
        log(f"  FAILED {line}")
    run.save()
    return result


# ------------------------------------------------------------------------------------ cli


def section_cli(run: Run, deadline: float) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    device = "cuda" if run.cuda else "cpu"
    work = run.work / "cli"
    data = work / "data"
    steps = 6 if run.smoke else 40
    log_file = run.out / "cli.txt"
    log_file.write_text(f"# hpseg CLI end to end on {device}\n")
    results: list[dict] = []

    def record(step: str, ok: bool, seconds: float, detail: str = "") -> None:
        results.append({"step": step, "ok": ok, "seconds": round(seconds, 1), "detail": detail})
        log(f"  {'ok  ' if ok else 'FAIL'} {step:12s} {seconds:6.1f} s  {detail}")

    def cli(step: str, arguments: list[str], check=None) -> bool:
        """Run ``python -m hpseg ARGS``; ``check(output)`` returns a detail string or raises."""
        command = [sys.executable, "-m", "hpseg", *arguments]
        timeout = max(10.0, deadline - time.perf_counter())
        started = time.perf_counter()
        try:
            out = subprocess.run(command, cwd=work, env=run.python_env(), capture_output=True, text=True,
                                 timeout=timeout)
            output, code = out.stdout + out.stderr, out.returncode
        except subprocess.TimeoutExpired as error:
            output, code = f"{error.stdout or ''}{error.stderr or ''}\nTIMEOUT after {timeout:.0f} s", -1
        seconds = time.perf_counter() - started
        with log_file.open("a") as stream:
            stream.write(f"\n\n$ {' '.join(command)}\n(return code {code}, {seconds:.1f} s)\n{output}")
        if code != 0:
            tail = output.strip().splitlines()[-3:]
            record(step, False, seconds, f"return code {code}: {' | '.join(tail)}")
            return False
        try:
            detail = check(output) if check else ""
        except Exception as error:  # noqa: BLE001
            record(step, False, seconds, f"check failed: {type(error).__name__}: {error}")
            return False
        record(step, True, seconds, detail or "")
        return True

    def python_step(step: str, function) -> bool:
        started = time.perf_counter()
        try:
            detail = function()
        except Exception as error:  # noqa: BLE001
            with log_file.open("a") as stream:
                stream.write(f"\n\n# {step}\n{traceback.format_exc()}")
            record(step, False, time.perf_counter() - started, f"{type(error).__name__}: {error}")
            return False
        record(step, True, time.perf_counter() - started, detail or "")
        return True

    work.mkdir(parents=True)
    common = [
        "--preset", "cocostuff27", "--data-root", str(data), "data.dataset=folder", "data.crop_size=32",
        "data.val_size=32", "data.num_workers=0", "method.n_classes=4",
    ]
    train_overrides = [
        "backbone.name=vit_tiny_p8", "backbone.pretrained=false", "method.dim=32", "method.pool_size=64",
        "method.warmup=10", "method.renew_interval=10", "train.batch_size=8", f"train.max_steps={steps}",
        f"train.val_interval={steps // 2}", "train.log_interval=2", f"train.checkpoint_interval={steps // 2}",
        "train.val_max_images=4", f"train.device={device}",
    ]

    def check_run(run_dir: Path, amp: str, cache: bool = False):
        def check(output: str) -> str:
            from hpseg.checkpoints.store import read_torch_file

            last = run_dir / "checkpoints" / "last.pt"
            assert last.exists() and (run_dir / "checkpoints" / "best.pt").exists(), "checkpoints missing"
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            losses = [r["loss"] for r in records if "loss" in r]
            assert losses and all(math.isfinite(v) for v in losses), f"losses {losses}"
            assert max(r.get("step", 0) for r in records) == steps, "not all steps ran"
            payload = read_torch_file(last, map_location=None)  # tensors where they were saved from
            devices = sorted({t.device.type for t in payload["model"].values()})
            assert devices == [device], f"checkpoint tensors on {devices}, expected {device}"
            assert ("cuda" in payload["training"]["rng"]) == run.cuda, "CUDA RNG state"
            assert payload["config"]["train"]["amp"] == amp
            if cache:
                assert "training from the feature cache" in output, "the run did not read the feature cache"
            return f"{len(losses)} finite losses (last {losses[-1]:.3f}), checkpoint tensors on {devices[0]}"
        return check

    # 1. the demo: data, training, evaluation, figure, all on the device
    demo = work / "demo"
    cli("demo", ["demo", "--out", str(demo), "--steps", str(steps), "--n-train", "8", "--n-val", "6",
                 "--device", device, "--no-progress"],
        lambda output: _check_demo(demo, device))

    # 2. data for the other steps: a synthetic folder dataset, cut into five crops by `hpseg prepare`
    def make_data() -> str:
        from hpseg.data import make_synthetic_dataset

        make_synthetic_dataset(data, n_train=12, n_val=4, size=64, n_classes=4, seed=0)
        return "12 training + 4 validation images of 64 px"

    python_step("data", make_data)
    cli("prepare", ["prepare", *common, "--no-progress"],
        lambda output: f"{len(list((data / 'hpseg_prepared' / 'train_32').glob('**/*.png')))} crop files")

    # 3. training with both AMP precisions (fp16 needs CUDA: the CPU run trains without AMP instead)
    runs = work / "runs"
    amps = ("fp16", "bf16") if run.cuda else ("none", "bf16")
    for amp in amps:
        cli(f"train_{amp}", ["train", *common, *train_overrides, f"train.amp={amp}", "data.feature_cache=off",
                             "--run-dir", str(runs / amp), "--no-progress"], check_run(runs / amp, amp))

    # 4. the feature cache, then training from it
    cache_dir = data / "hpseg_prepared" / "train_32" / "feature_cache" / "vit_tiny_p8"
    def check_cache(output: str) -> str:
        assert (cache_dir / "meta.json").exists(), f"no meta.json in {cache_dir}"
        return f"{sum(f.stat().st_size for f in cache_dir.iterdir()) / 2**10:.0f} KiB in {cache_dir}"

    cli("cache", ["cache", *common, *train_overrides, f"train.amp={amps[0]}", "--no-progress"], check_cache)
    cli("train_cache", ["train", *common, *train_overrides, f"train.amp={amps[0]}", "--run-dir", str(runs / "cached"),
                        "--no-progress"], check_run(runs / "cached", amps[0], cache=True))

    # 5. evaluation, prediction and the Python API on the fp16 (CPU: no-AMP) checkpoint
    checkpoint = runs / amps[0] / "checkpoints" / "last.pt"
    cli("eval", ["eval", str(checkpoint), "--device", device, "--baseline", "--max-images", "4", "--no-progress"],
        lambda output: _check_eval(checkpoint.parent.parent / "eval-last" / "results.json"))
    images = sorted((data / "val" / "images").glob("*.png"))[:2]
    predictions = work / "predictions"
    cli("predict", ["predict", *map(str, images), "--checkpoint", str(checkpoint), "--out", str(predictions),
                    "--device", device, "--figure", "--no-progress"],
        lambda output: _check_predict(predictions, images))

    def api() -> str:
        import hpseg

        segmenter = hpseg.load(checkpoint, device=device, echo=lambda message: None)
        image = Image.open(images[0])
        labels = segmenter.segment(image)
        assert labels.shape == (image.height, image.width), labels.shape
        assert isinstance(labels, np.ndarray) and labels.min() >= 0 and labels.max() < segmenter.n_clusters
        linear = segmenter.segment(image, head="linear")
        assert linear.shape == labels.shape
        devices = {p.device.type for p in segmenter.model.parameters()} | {
            p.device.type for p in segmenter.backbone.parameters()}
        assert devices == {device}, f"model / backbone parameters on {devices}"
        features = segmenter.features(image)
        assert torch.isfinite(features.segmentation).all()
        return (f"segment {labels.shape} ids {sorted(np.unique(labels).tolist())}, parameters on {device}, "
                f"features {tuple(features.segmentation.shape)}")

    python_step("api", api)
    failures = [r["step"] for r in results if not r["ok"]]
    return {"steps": results, "failures": failures, "passed": f"{len(results) - len(failures)}/{len(results)}",
            "log": str(log_file)}


def _finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _finite_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _finite_numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _check_demo(demo: Path, device: str) -> str:
    metrics = json.loads((demo / "metrics.json").read_text())
    assert (demo / "figure.png").exists(), "no figure.png"
    assert metrics["device"].startswith(device), f"demo ran on {metrics['device']}"
    hp = metrics["hp"]
    return f"HP unsup. mIoU {hp['unsupervised_miou']:.3f}, baseline {metrics['baseline']['unsupervised_miou']:.3f}"


def _check_eval(path: Path) -> str:
    results = json.loads(path.read_text())
    numbers = _finite_numbers(results)
    assert numbers and all(math.isfinite(v) for v in numbers), "non-finite numbers in results.json"
    hp = results.get("hp", results)
    keys = [k for k in ("unsupervised_miou", "linear_miou") if k in hp]
    return ", ".join(f"{k} {hp[k]:.3f}" for k in keys) or "results.json written"


def _check_predict(out: Path, images: list[Path]) -> str:
    import numpy as np
    from PIL import Image

    summary = json.loads((out / "predictions.json").read_text())
    labels = sorted((out / "labels").rglob("*.png"))
    assert len(labels) == len(images), f"{len(labels)} label maps for {len(images)} images"
    for image in images:
        label = next(p for p in labels if p.name == image.name)
        assert np.array(Image.open(label)).shape == Image.open(image).size[::-1], "label map size"
    assert len(list((out / "figures").rglob("*.png"))) == len(images), "figures missing"
    return f"{len(labels)} label maps at the images' size, figures, predictions.json ({len(summary)} keys)"


# ------------------------------------------------------------------------------------ golden


def section_golden(run: Run, deadline: float) -> dict:
    import torch
    from loss_benchmark import hpseg_on_golden
    from reference_style_loss import golden_cases, golden_loss

    cases = golden_cases()
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    limits = {"auto": {}, "dense": {"SPARSE_DENSITY_LIMIT": -1.0}, "sparse": {"SPARSE_DENSITY_LIMIT": 2.0}}
    rows = []
    cpu = {name: hpseg_on_golden(g, "cpu") for name, g in cases}
    # The combinations in order of importance (float32 first), each on every golden file.
    combos = [("hpseg", d, k) for d in dtypes for k in limits] + [("baseline", "fp32", "-"),
                                                                 ("baseline", "autocast-fp16", "-")]
    for impl, dtype_name, kernels in combos:
        for name, g in cases:
            row = {"file": name, "impl": impl, "dtype": dtype_name, "kernels": kernels}
            rows.append(row)
            if time.perf_counter() > deadline:
                row["error"] = "skipped: section budget spent"
                continue
            started = time.perf_counter()
            try:
                if impl == "hpseg":
                    with loss_settings(**limits[kernels]):
                        loss, gz, gzm = hpseg_on_golden(g, run.device, dtypes[dtype_name])
                    row["cpu_loss_err"], row["cpu_grad_err"] = relative_errors(loss, (gz, gzm), cpu[name][0],
                                                                               cpu[name][1:])
                else:
                    autocast = dtype_name != "fp32"
                    context = torch.autocast(run.device.type, dtype=torch.float16) if autocast else contextlib.nullcontext()
                    with context:
                        loss, gz, gzm = golden_loss(g, run.device)
                row["loss"] = float(loss)
                row["loss_err"], row["grad_err"] = relative_errors(loss, (gz, gzm), g["loss"],
                                                                   (g["grad_z"], g["grad_z_mix"]))
                row["pass_readme_tolerance"] = row["loss_err"] <= 1e-3 and row["grad_err"] <= 1e-3
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {error}"
            row["seconds"] = round(time.perf_counter() - started, 3)  # the first CUDA calls include compiling
    # One line per (implementation, dtype, kernels): the worst of the golden files.
    summary = {}
    for row in rows:
        key = f"{row['impl']} {row['dtype']} {row['kernels']}"
        entry = summary.setdefault(key, {"loss_err": 0.0, "grad_err": 0.0, "cpu_loss_err": None, "cpu_grad_err": None,
                                         "passed": 0, "files": 0, "skipped": 0, "errors": []})
        entry["files"] += 1
        if row.get("error", "").startswith("skipped"):
            entry["skipped"] += 1
            continue
        if "error" in row:
            entry["errors"].append(f"{row['file']}: {row['error']}")
            continue
        entry["passed"] += bool(row["pass_readme_tolerance"])
        for k in ("loss_err", "grad_err", "cpu_loss_err", "cpu_grad_err"):
            if k in row:
                entry[k] = max(entry[k] or 0.0, row[k])
    for key, e in summary.items():
        log(f"  {key:32s} vs golden: loss {fmt(e['loss_err'], '.1e')}, grads {fmt(e['grad_err'], '.1e')}; "
            f"vs CPU fp32: loss {fmt(e['cpu_loss_err'], '.1e')}, grads {fmt(e['cpu_grad_err'], '.1e')}; "
            f"README tolerance {e['passed']}/{e['files']}" + (f"; ERRORS {e['errors']}" if e["errors"] else "")
            + (f"; {e['skipped']} skipped (time)" if e["skipped"] else ""))
    failures = [k for k, e in summary.items()
                if e["errors"] or (" fp32 " in f" {k} " and e["passed"] < e["files"] - e["skipped"])]
    return {"rows": rows, "summary": summary, "failures": failures,
            "note": "README tolerance: 1e-3 relative on the loss, 1e-3 x max|grad| on the gradients; "
                    "float32 must meet it, half precision is reported only"}


# ------------------------------------------------------------------------------------ loss


class SparseFlops:
    """Counts the FLOPs of the sparse products FlopCounterMode does not see: 2 x pairs x width."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count(func, args)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.flops = 0
        self.calls: dict[str, int] = {}

    def count(self, func, args) -> None:
        import torch

        name = func.overloadpacket.__name__
        sparse = [a for a in args if isinstance(a, torch.Tensor) and a.layout != torch.strided]
        if not sparse or "mm" not in name:
            return
        if name == "sparse_sampled_addmm":  # (pattern CSR, mat1 (r, k), mat2 (k, c)): one k-dot per pair
            flops = 2 * args[0]._nnz() * args[1].shape[-1]
        else:  # addmm(_) / mm with a CSR operand: each stored entry times a dense row
            dense = [a for a in args[1:] if isinstance(a, torch.Tensor) and a.layout == torch.strided]
            flops = 2 * sparse[0]._nnz() * dense[-1].shape[-1]
        self.flops += flops
        self.calls[name] = self.calls.get(name, 0) + 1


def count_flops(function) -> dict:
    """FLOPs of the products in ``function()``: dense (FlopCounterMode) and sparse (SparseFlops)."""
    from torch.utils.flop_counter import FlopCounterMode

    sparse = SparseFlops()
    with FlopCounterMode(display=False) as counter, sparse.mode:
        function()
    by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    dense = counter.get_total_flops()
    return {"dense": dense, "sparse": sparse.flops, "total": dense + sparse.flops, "dense_by_op": by_op,
            "sparse_calls": sparse.calls}


def loss_call(impl: str, dtype_name: str, settings: argparse.Namespace, device_type: str):
    """The loss of one case as a function (z, z_mix, inputs) -> scalar."""
    import torch
    from loss_benchmark import loss_function

    if impl == "hpseg":
        return loss_function("hpseg", settings, {"fp32": torch.float32, "fp16": torch.float16,
                                                 "bf16": torch.bfloat16}[dtype_name])
    baseline = loss_function("baseline", settings)
    if dtype_name == "fp32":
        return baseline

    def under_autocast(z, z_mix, x):  # the reference trains with fp16 AMP
        with torch.autocast(device_type, dtype=torch.float16):
            return baseline(z, z_mix, x)

    return under_autocast


def measure_case(run: Run, case: dict, call, x: dict, setting: dict, deadline: float, count: bool) -> dict | None:
    """Time forward + backward of ``call`` on inputs ``x`` into ``case``; returns the FLOP count if ``count``.

    Memory: peak CUDA allocation over the runs, minus the allocation before them (inputs on the
    device already): "net" is what the loss and its gradients add.
    """
    import torch

    z, z_mix = x["z"].clone().requires_grad_(), x["z_mix"].clone().requires_grad_()
    values = []

    def step():
        z.grad = z_mix.grad = None
        loss = call(z, z_mix, x)
        loss.backward()
        values.append(loss.detach())

    flops = None
    try:
        with loss_settings(**setting):
            run.sync()
            if run.cuda:
                torch.cuda.reset_peak_memory_stats(run.device)
            before = torch.cuda.memory_allocated(run.device) if run.cuda else 0
            case.update(timed_runs(run, step, deadline))
            if run.cuda:
                peak = torch.cuda.max_memory_allocated(run.device)
                case.update(peak_net_gib=(peak - before) / GIB, peak_abs_gib=peak / GIB)
        case["loss"] = float(values[-1])
        case["status"] = "ok" if math.isfinite(case["loss"]) else "non-finite loss"
        case["grads"] = (z.grad.detach(), z_mix.grad.detach())  # popped by the caller
    except torch.cuda.OutOfMemoryError as error:
        case["status"] = "OOM"
        case["error"] = str(error).splitlines()[0][:200]
    except Exception as error:  # noqa: BLE001
        case["status"] = f"error: {type(error).__name__}: {error}"[:300]
        case["traceback"] = traceback.format_exc()
    finally:
        values.clear()
        gc.collect()
        if run.cuda:
            torch.cuda.empty_cache()
    if count and case.get("status") == "ok" and time.perf_counter() + 3 * case["median_s"] < deadline:
        try:  # the compiled helpers off: FLOPs are counted eagerly
            with loss_settings(**{**setting, **_eager()}):
                flops = count_flops(step)
        except Exception as error:  # noqa: BLE001 - the timing stands without its FLOP count
            case["flop_error"] = f"{type(error).__name__}: {error}"[:300]
        finally:
            values.clear()
            z.grad = z_mix.grad = None
    return flops


def section_loss(run: Run, deadline: float) -> dict:
    import torch
    from loss_benchmark import synthetic_inputs

    smoke = run.smoke
    settings = argparse.Namespace(seed=0, side=8 if smoke else 28, dim=64 if smoke else 512,
                                  feature_dim=48 if smoke else 384, pool=128 if smoke else 2048,
                                  rho=0.02, lmbd=0.5, tau=0.8)
    batches = [int(b) for b in run.args.loss_batches.split(",")] if run.args.loss_batches else (
        [2, 4] if smoke else [8, 16, 32, 64])
    max_case_s = 60.0 if smoke else run.args.max_case_s
    variants = hpseg_variants()
    log(f"  settings: {vars(settings)}, batches {batches}, hpseg kernel variants {list(variants)}")
    if not run.ceilings:  # env not run: the ceilings for the achieved TFLOP/s
        measure_ceilings(run, deadline)
    # Priority order: the comparison first, the kernel variants after (skipped first when time is short).
    # The torch-path variant differs from auto under half precision only (float32 stays on the torch path).
    tiers = [[("baseline", "fp32", "-"), ("baseline", "autocast-fp16", "-")]
             + [("hpseg", d, "auto") for d in ("fp32", "fp16", "bf16")],
             [("hpseg", d, v) for v in variants if v != "auto" for d in ("fp32", "fp16", "bf16")
              if not (v == "torch" and d == "fp32")]]
    inputs_cpu = {b: synthetic_inputs(settings, b) for b in batches}
    log(f"  inputs built on the CPU ({time.perf_counter() - run.started:.0f} s into the run)")
    cases: list[dict] = []
    flops: dict = {}
    reference: dict = {}  # batch -> hpseg fp32 auto (loss, grads on the CPU)
    last_time: dict = {}  # (impl, dtype, kernels) -> (batch, median s)
    for tier in tiers:
        for batch in batches:
            x = {k: (v.to(run.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs_cpu[batch].items()}
            for impl, dtype_name, kernels in tier:
                case = {"batch": batch, "n": x["z"].shape[0], "impl": impl, "dtype": dtype_name, "kernels": kernels}
                cases.append(case)
                key = (impl, dtype_name, kernels)
                # Predicted time from the previous batch (cost ~ N^2) against the limit and the time left.
                predicted = 0.0
                if key in last_time:
                    previous_batch, previous_s = last_time[key]
                    predicted = case["predicted_s"] = previous_s * (batch / previous_batch) ** 2
                if predicted > max_case_s or time.perf_counter() + max(1.0, 2.5 * predicted) > deadline:
                    case["status"] = (f"skipped: predicted {predicted:.1f} s per call" if predicted > max_case_s
                                      else "skipped: section budget spent")
                    log(f"  B={batch:3d} {impl:8s} {dtype_name:13s} {kernels:6s} {case['status']}")
                    continue
                flop_key = f"{impl} {kernels} B={batch}"
                count = dtype_name in ("fp32",) and flop_key not in flops
                counted = measure_case(run, case, loss_call(impl, dtype_name, settings, run.device.type), x,
                                       variants.get(kernels, {}), deadline, count)
                if counted:
                    flops[flop_key] = counted
                grads = case.pop("grads", None)
                if case.get("status") == "ok":
                    last_time[key] = (batch, case["median_s"])
                    if key == ("hpseg", "fp32", "auto"):
                        reference[batch] = (case["loss"], tuple(g.cpu() for g in grads))
                    elif batch in reference:
                        case["loss_err_vs_hpseg_fp32"], case["grad_err_vs_hpseg_fp32"] = relative_errors(
                            case["loss"], grads, *reference[batch])
                del grads
                if impl == "hpseg" and case.get("status") == "ok" and uses_triton(
                        run.device.type, dtype_name, variants.get(kernels, {})):
                    case["triton"] = True
                    case["gflop"] = triton_loss_flops(case["n"], settings.feature_dim, settings.dim,
                                                      settings.lmbd) / 1e9
                    case["tflops"] = case["gflop"] / 1e3 / case["median_s"]
                    case["percent_of_ceiling"] = 100 * case["tflops"] / run.ceilings.get(dtype_name, math.inf)
                elif flop_key in flops and case.get("status") == "ok":
                    case["gflop"] = flops[flop_key]["total"] / 1e9
                    case["tflops"] = flops[flop_key]["total"] / case["median_s"] / 1e12
                    ceiling = run.ceilings.get({"autocast-fp16": "fp16"}.get(dtype_name, dtype_name))
                    if ceiling:
                        case["percent_of_ceiling"] = 100 * case["tflops"] / ceiling
                log(f"  B={batch:3d} {impl:8s} {dtype_name:13s} {kernels:6s} {case.get('status')}: "
                    f"median {fmt(case.get('median_s'), '.4f')} s {case.get('times_s', '')} warm-up "
                    f"{case.get('warmup_s', '')}, peak net {fmt(case.get('peak_net_gib'), '.3f')} GiB "
                    f"(abs {fmt(case.get('peak_abs_gib'), '.3f')}), loss {fmt(case.get('loss'), '.5f')}"
                    + (f" (vs hpseg fp32: {case['loss_err_vs_hpseg_fp32']:.1e} / grads "
                       f"{case['grad_err_vs_hpseg_fp32']:.1e})" if "loss_err_vs_hpseg_fp32" in case else "")
                    + f", {fmt(case.get('tflops'), '.4g')} TFLOP/s")
                run.save()
            del x
            gc.collect()
            if run.cuda:
                torch.cuda.empty_cache()
    errors = [c for c in cases if str(c.get("status", "")).startswith(("error", "non-finite"))]
    result = {"settings": vars(settings), "batches": batches, "variants": {k: str(v) for k, v in variants.items()},
              "cases": cases, "flops": flops,
              "failures": [f"B={c['batch']} {c['impl']} {c['dtype']} {c['kernels']}: {c['status']}" for c in errors],
              "flop_note": "dense products counted by torch.utils.flop_counter.FlopCounterMode (forward and, for "
                           "the baseline, autograd backward); sparse kernels (sampled_addmm, CSR addmm_) counted "
                           "as 2 x stored pairs x width; elementwise work not counted. Counted once per batch and "
                           "kernel variant on the float32 run (hpseg with compiled helpers off)."}
    try:
        from torch._dynamo.utils import counters

        result["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")}
    except Exception:  # noqa: BLE001
        pass
    return result


def _eager() -> dict:
    """Settings that turn the loss's compiled CUDA helpers off, if it has them (flop counting is eager)."""
    import hpseg.method.losses as losses

    return {"fused": False} if hasattr(losses, "_FusedOnCuda") else {}


# ------------------------------------------------------------------------------------ step


def _stream(command: list[str], run: Run, timeout: float) -> tuple[int | None, list[str]]:
    """Run ``command``, echoing its output as it comes; (return code or None on timeout, lines)."""
    import threading

    lines: list[str] = []
    process = subprocess.Popen(command, cwd=ROOT, env=run.python_env(), stdout=subprocess.PIPE,
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


def section_step(run: Run, deadline: float) -> dict:
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
        code, lines = _stream(command, run, max(10.0, deadline - started))
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
            "note": "step = next(inputs) + Trainer.training_step, synchronised; inputs = the fetch part; HP loss = "
                    "the hidden_positive_loss call inside the step (synchronised around it); peak = "
                    "torch.cuda.max_memory_allocated over the steps, after the pools were built"}


# ------------------------------------------------------------------------------------ summary


def summary(run: Run) -> None:
    s = run.results["sections"]
    log("\n" + "=" * 30 + f" SUMMARY ({run.device}{', smoke' if run.smoke else ''}) " + "=" * 30)
    log("sections: " + " | ".join(f"{k} {v['status']} {v.get('elapsed_s', 0):.0f}s" for k, v in s.items())
        + f"   (total {time.perf_counter() - run.started:.0f} s)")
    env = s.get("env", {})
    if env.get("status") == "ok":
        i = env["info"]
        log(f"env: {i.get('name')} cc {i.get('capability', '-')} {i.get('memory_gib', '-')} GiB; torch {i['torch']}, "
            f"timm {i['timm']}, Python {i['python']}")
        log("  matmul TFLOP/s measured (datasheet): " + ", ".join(
            f"{k} {v:.4g} ({DATASHEET_TFLOPS[k]:.0f})" for k, v in env["matmul_tflops"].items())
            + (f"; copy {env['copy_gb_s']:.0f} GB/s" if env.get("copy_gb_s") else ""))
    p = s.get("pytest", {})
    if p:
        counts = p.get("counts")
        log(f"pytest: {p.get('status')}: {p.get('summary_line') or p.get('note') or p.get('error')}"
            + (f"; junit {counts}; CUDA test: {p.get('cuda_test')}" if counts else ""))
        for line in (p.get("failures") or [])[:6]:
            log(f"  FAILED {line[:150]}")
    c = s.get("cli", {})
    if c.get("steps"):
        log(f"cli: {c['passed']} steps ok: " + ", ".join(
            f"{r['step']} {'ok' if r['ok'] else 'FAIL'} {r['seconds']:.0f}s" for r in c["steps"]))
        for r in c["steps"]:
            if not r["ok"]:
                log(f"  FAIL {r['step']}: {r['detail'][:200]}")
    g = s.get("golden", {})
    if g.get("summary"):
        log("golden (worst of 3 files; rel. error vs golden loss / grads; vs CPU fp32; files within README 1e-3):")
        for key, e in g["summary"].items():
            log(f"  {key:28s} {fmt(e['loss_err'], '.1e')} / {fmt(e['grad_err'], '.1e')}   CPU "
                f"{fmt(e['cpu_loss_err'], '.1e')} / {fmt(e['cpu_grad_err'], '.1e')}   {e['passed']}/{e['files']}"
                + (" ERRORS" if e["errors"] else "") + (f" ({e['skipped']} skipped)" if e["skipped"] else ""))
    lo = s.get("loss", {})
    if lo.get("cases"):
        summary_loss(run, lo)
    st = s.get("step", {})
    if st.get("rows"):
        log(f"step (train_step_benchmark, median of timed steps, {st.get('num_workers')} loader processes; "
            "HP loss = its call inside the step):")
        log("| model | B | alpha | mode | step s | inputs s | HP loss s (share) | peak GiB | HP loss finite |")
        log("|---|---|---|---|---|---|---|---|---|")
        for r in st["rows"]:
            share = f" ({100 * r['loss_share']:.0f}%)" if r.get("loss_share") else ""
            log(f"| {r['name']} {r['crop']}px | {r['batch']} | {r['alpha']} | {r['mode']} | {r['step_s']:.3f} | "
                f"{r['fetch_s']:.3f} | {fmt(r.get('loss_s'))}{share} | {r['peak_gib']:.2f} | {r['hp_finite']} |")
    failed = [k for k, v in s.items() if v["status"] == "failed"]
    log(f"results: {run.out / 'gpu_results.json'}; failed sections: {', '.join(failed) or 'none'}")


def summary_loss(run: Run, lo: dict) -> None:
    cases = {(c["batch"], c["impl"], c["dtype"], c["kernels"]): c for c in lo["cases"]}

    def cell(c, memory=True):
        if not c:
            return "-"
        if c.get("status") != "ok":
            return str(c.get("status", "-")).split(":")[0]
        return f"{c['median_s']:.4f}" + (f" ({c['peak_net_gib']:.2f})" if memory and "peak_net_gib" in c else "")

    def ratio(a, b, key):
        if a and b and a.get("status") == "ok" and b.get("status") == "ok" and a.get(key) and b.get(key):
            return f"{a[key] / b[key]:.1f}x"
        return "-"

    log("loss fwd+bwd: median s (peak net GiB); ratios = baseline / hpseg (time, memory):")
    log("| B | N | base fp32 | hpseg fp32 | speed, mem | base ac-fp16 | hpseg fp16 | speed, mem | hpseg bf16 "
        "| speed, mem (vs ac-fp16) |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for b in lo["batches"]:
        b32, h32 = cases.get((b, "baseline", "fp32", "-")), cases.get((b, "hpseg", "fp32", "auto"))
        b16, h16 = cases.get((b, "baseline", "autocast-fp16", "-")), cases.get((b, "hpseg", "fp16", "auto"))
        hbf = cases.get((b, "hpseg", "bf16", "auto"))
        n = (h32 or b32 or {}).get("n", 0)
        log(f"| {b} | {n:,} | {cell(b32)} | {cell(h32)} | {ratio(b32, h32, 'median_s')}, "
            f"{ratio(b32, h32, 'peak_net_gib')} | {cell(b16)} | {cell(h16)} | {ratio(b16, h16, 'median_s')}, "
            f"{ratio(b16, h16, 'peak_net_gib')} | {cell(hbf)} | {ratio(b16, hbf, 'median_s')}, "
            f"{ratio(b16, hbf, 'peak_net_gib')} |")
    variants = [v for v in ("auto", "torch", "dense", "sparse", "eager") if any(k[3] == v for k in cases)]
    log("hpseg kernel variants: median s; achieved TFLOP/s of the products (% of the measured ceiling of the dtype):")
    log("| B | dtype | " + " | ".join(variants) + " | GFLOP auto (dense + sparse) | TFLOP/s auto (% ceiling) |")
    log("|---|---|" + "---|" * len(variants) + "---|---|")
    for b in lo["batches"]:
        for d in ("fp32", "fp16", "bf16"):
            auto = cases.get((b, "hpseg", d, "auto"), {})
            flops = lo["flops"].get(f"hpseg auto B={b}")
            gflop = f"{flops['dense'] / 1e9:.4g} + {flops['sparse'] / 1e9:.4g}" if flops else "-"
            if auto.get("triton"):
                gflop = f"{auto['gflop']:.4g} (Triton kernels, analytic)"
            tflops = fmt(auto.get("tflops"), ".4g") + (f" ({auto['percent_of_ceiling']:.3g}%)"
                                                       if auto.get("percent_of_ceiling") else "")
            log(f"| {b} | {d} | " + " | ".join(cell(cases.get((b, "hpseg", d, v)), memory=False) for v in variants)
                + f" | {gflop} | {tflops} |")
    skipped = [f"B={c['batch']} {c['impl']} {c['dtype']} {c['kernels']}" for c in lo["cases"]
               if str(c.get("status", "")).startswith("skipped")]
    if skipped:
        log(f"  skipped ({len(skipped)}): " + "; ".join(skipped)[:400])


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of: " + ", ".join(SECTIONS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test of this script)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--out", help="output folder (default: $OUT, else a temporary folder)")
    parser.add_argument("--deadline", type=float, default=360.0,
                        help="seconds after which no section starts and budgets are cut (default 360)")
    parser.add_argument("--pytest-workers", type=int, default=8)
    parser.add_argument("--pytest-timeout", type=int, default=150)
    parser.add_argument("--pytest-on-cpu", action="store_true", help="run the test suite on a CPU run too")
    parser.add_argument("--pytest-foreground", action="store_true",
                        help="wait for the tests at once instead of running cli and golden beside them")
    parser.add_argument("--loss-batches", help="comma-separated batch sizes of the loss section")
    parser.add_argument("--max-case-s", type=float, default=6.0,
                        help="loss section: skip a case predicted to take longer per call (default 6)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = Run(args)
    log(f"gpu_benchmark: sections {sections} on {run.device}{' (smoke sizes)' if run.smoke else ''}; "
        f"out {run.out}; work {run.work}; deadline {args.deadline:.0f} s")
    functions = {"env": section_env, "pytest": section_pytest_start, "cli": section_cli, "golden": section_golden,
                 "loss": section_loss, "step": section_step}
    try:
        for name in SECTIONS:  # fixed order: env first (clean timings), the tests beside the untimed sections
            if name not in sections:
                continue
            if name in ("loss", "step") and run.pytest_job:
                finish_pytest(run)
            run_section(run, name, functions[name], [s for s in SECTIONS[SECTIONS.index(name) + 1:] if s in sections])
        if run.pytest_job:
            finish_pytest(run)
    finally:
        if run.pytest_job:  # interrupted: do not leave the tests running
            run.pytest_job["process"].kill()
        run.save()
        if not args.keep_work:
            shutil.rmtree(run.work, ignore_errors=True)
    summary(run)
    failed = [k for k, v in run.results["sections"].items() if v["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
