"""Forward + backward of the GHP + LHP loss on a device: time, memory, FLOPs, by backend and dtype.

At 28 x 28 patches, D = 512, C = 384, pool 2048, rho 0.02, lambda 0.5, tau 0.8, batches 8-64
(``loss_benchmark.synthetic_inputs``): the reference-style baseline in float32 and under fp16
autocast, hpseg with float32 / float16 / bfloat16 products (as the trainer passes ``matmul_dtype``
under AMP), each through the ``auto`` backend (on CUDA under half precision: the fused Triton
kernels), and through the torch path (``LossBackend("torch")``), with every tile dense, every tile
sparse and its compiled CUDA helpers off (``common.loss_backends``). The comparison cases run first
for every batch, the backend variants after, so a short deadline drops variants rather than
batches. Median time (1 warm-up, median of 3; 1 if a call takes > 3 s), peak CUDA memory over the
memory before the call (net) and absolute; FLOPs of the products (FlopCounterMode for the dense
ones, the sampled pairs for the sparse kernels, counted analytically for the Triton kernels:
``triton_loss_flops``) and the achieved TFLOP/s against the device's measured matrix-product
ceilings (8192^3 products in bf16, fp16, tf32 and fp32, measured first, next to the H100/H200
datasheet peaks). Cases whose time, predicted from the previous batch (~ batch^2), passes
``--max-case-s`` or the time left are skipped and listed; CUDA out-of-memory is recorded as OOM.

    python benchmarks/gpu_loss.py --device cuda --out DIR --batches 16,32,64
    HF_HUB_OFFLINE=1 python benchmarks/gpu_loss.py --smoke --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import sys
import time
import traceback

import torch
from common import DTYPES, GIB, fmt, log, loss_backends, relative_errors, run_check, timed_runs
from loss_benchmark import loss_function, synthetic_inputs
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from hpseg.method import SharedContrastPattern
from hpseg.method.positives import PositiveInputs

# Datasheet dense peaks of the H100 / H200 SXM (TFLOP/s; the H200 has the H100's compute).
DATASHEET_TFLOPS = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}


def triton_loss_flops(n: int, feature_dim: int, dim: int, lmbd: float) -> float:
    """FLOPs of the products of the loss's Triton path: each kernel computes, for every ordered pair,
    the similarities of f and (with lambda != 0) s' and the logits of z and z_mix; then G @ e for both."""
    per_pair = 2 * (feature_dim + (dim if lmbd else 0) + 2 * dim) + 2 * dim
    return 2.0 * n * n * per_pair



def matmul_tflops(run, dtype, size: int, tf32: bool, repeats: int = 10) -> float:
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


def measure_ceilings(run, deadline: float) -> dict:
    """Matrix-product rates of the device in bf16, fp16, tf32 and plain fp32 (TFLOP/s)."""
    ceilings = {}
    size = 512 if run.smoke else 8192
    for label, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                               ("tf32", torch.float32, True), ("fp32", torch.float32, False)):
        if time.perf_counter() > deadline:
            break
        ceilings[label] = matmul_tflops(run, dtype, size, tf32)
        log(f"  matmul {size}^3 {label}: {ceilings[label]:.4g} TFLOP/s (datasheet H100/H200 SXM "
            f"{DATASHEET_TFLOPS[label]:.0f})")
    return ceilings


class SparseFlops:
    """Counts the FLOPs of the sparse products FlopCounterMode does not see: 2 x pairs x width."""

    def __init__(self) -> None:
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count(func, args)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.flops = 0
        self.calls: dict[str, int] = {}

    def count(self, func, args) -> None:
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
    sparse = SparseFlops()
    with FlopCounterMode(display=False) as counter, sparse.mode:
        function()
    by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    dense = counter.get_total_flops()
    return {"dense": dense, "sparse": sparse.flops, "total": dense + sparse.flops, "dense_by_op": by_op,
            "sparse_calls": sparse.calls}


def uses_triton(backend, x: dict, dtype_name: str) -> bool:
    """Whether the backend sends the case's inputs through the Triton kernels (its own choice)."""
    inputs = PositiveInputs.build(x["f"], x["s_ema"], x["pool_ag"], x["pool_sp"], x["hw"],
                                  SharedContrastPattern(x["pattern"]), DTYPES[dtype_name])
    return backend.uses_triton(inputs, DTYPES[dtype_name])


def loss_call(impl: str, dtype_name: str, settings: argparse.Namespace, device_type: str, backend):
    """The loss of one case as a function (z, z_mix, inputs) -> scalar."""
    if impl == "hpseg":
        return loss_function("hpseg", settings, DTYPES[dtype_name], backend)
    baseline = loss_function("baseline", settings)
    if dtype_name == "fp32":
        return baseline

    def under_autocast(z, z_mix, x):  # the reference trains with fp16 AMP
        with torch.autocast(device_type, dtype=torch.float16):
            return baseline(z, z_mix, x)

    return under_autocast


def measure_case(run, case: dict, impl: str, settings: argparse.Namespace, x: dict, backend, count: bool) -> dict | None:
    """Time forward + backward of ``call`` on inputs ``x`` into ``case``; returns the FLOP count if ``count``.

    Memory: peak CUDA allocation over the runs, minus the allocation before them (inputs on the
    device already): "net" is what the loss and its gradients add.
    """
    call = loss_call(impl, case["dtype"], settings, run.device.type, backend)
    deadline = run.deadline
    z, z_mix = x["z"].clone().requires_grad_(), x["z_mix"].clone().requires_grad_()
    values = []

    def step():
        z.grad = z_mix.grad = None
        loss = call(z, z_mix, x)
        loss.backward()
        values.append(loss.detach())

    flops = None
    try:
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
            eager = backend if backend is None else dataclasses.replace(backend, compile=False)
            call = loss_call(impl, case["dtype"], settings, run.device.type, eager)
            flops = count_flops(step)
        except Exception as error:  # noqa: BLE001 - the timing stands without its FLOP count
            case["flop_error"] = f"{type(error).__name__}: {error}"[:300]
        finally:
            values.clear()
            z.grad = z_mix.grad = None
    return flops


def check(run) -> dict:
    smoke = run.smoke
    settings = argparse.Namespace(seed=0, side=8 if smoke else 28, dim=64 if smoke else 512,
                                  feature_dim=48 if smoke else 384, pool=128 if smoke else 2048,
                                  rho=0.02, lmbd=0.5, tau=0.8)
    batches = [int(b) for b in run.args.batches.split(",")] if run.args.batches else (
        [2, 4] if smoke else [8, 16, 32, 64])
    max_case_s = 60.0 if smoke else run.args.max_case_s
    variants = loss_backends()
    log(f"  settings: {vars(settings)}, batches {batches}, hpseg backends {list(variants)}")
    ceilings = measure_ceilings(run, run.deadline)
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
    last_time: dict = {}  # (impl, dtype, backend_name) -> (batch, median s)
    for tier in tiers:
        for batch in batches:
            x = {k: (v.to(run.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs_cpu[batch].items()}
            for impl, dtype_name, backend_name in tier:
                case = {"batch": batch, "n": x["z"].shape[0], "impl": impl, "dtype": dtype_name, "backend": backend_name}
                cases.append(case)
                key = (impl, dtype_name, backend_name)
                # Predicted time from the previous batch (cost ~ N^2) against the limit and the time left.
                predicted = 0.0
                if key in last_time:
                    previous_batch, previous_s = last_time[key]
                    predicted = case["predicted_s"] = previous_s * (batch / previous_batch) ** 2
                if predicted > max_case_s or time.perf_counter() + max(1.0, 2.5 * predicted) > run.deadline:
                    case["status"] = (f"skipped: predicted {predicted:.1f} s per call" if predicted > max_case_s
                                      else "skipped: deadline")
                    log(f"  B={batch:3d} {impl:8s} {dtype_name:13s} {backend_name:6s} {case['status']}")
                    continue
                flop_key = f"{impl} {backend_name} B={batch}"
                count = dtype_name in ("fp32",) and flop_key not in flops
                counted = measure_case(run, case, impl, settings, x, variants.get(backend_name), count)
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
                if impl == "hpseg" and case.get("status") == "ok" and uses_triton(variants[backend_name], x, dtype_name):
                    case["triton"] = True
                    case["gflop"] = triton_loss_flops(case["n"], settings.feature_dim, settings.dim,
                                                      settings.lmbd) / 1e9
                    case["tflops"] = case["gflop"] / 1e3 / case["median_s"]
                    case["percent_of_ceiling"] = 100 * case["tflops"] / ceilings.get(dtype_name, math.inf)
                elif flop_key in flops and case.get("status") == "ok":
                    case["gflop"] = flops[flop_key]["total"] / 1e9
                    case["tflops"] = flops[flop_key]["total"] / case["median_s"] / 1e12
                    ceiling = ceilings.get({"autocast-fp16": "fp16"}.get(dtype_name, dtype_name))
                    if ceiling:
                        case["percent_of_ceiling"] = 100 * case["tflops"] / ceiling
                log(f"  B={batch:3d} {impl:8s} {dtype_name:13s} {backend_name:6s} {case.get('status')}: "
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
              "failures": [f"B={c['batch']} {c['impl']} {c['dtype']} {c['backend']}: {c['status']}" for c in errors],
              "flop_note": "dense products counted by torch.utils.flop_counter.FlopCounterMode (forward and, for "
                           "the baseline, autograd backward); sparse kernels (sampled_addmm, CSR addmm_) counted "
                           "as 2 x stored pairs x width; elementwise work not counted. Counted once per batch and "
                           "kernel variant on the float32 run (hpseg with compiled helpers off)."}
    result["dynamo"] = {k: dict(v) for k, v in dynamo_counters.items() if k in ("stats", "recompiles", "graph_break")}
    return result


def summary(run) -> None:
    lo = run.results
    if not lo.get("cases"):
        return
    cases = {(c["batch"], c["impl"], c["dtype"], c["backend"]): c for c in lo["cases"]}

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
    skipped = [f"B={c['batch']} {c['impl']} {c['dtype']} {c['backend']}" for c in lo["cases"]
               if str(c.get("status", "")).startswith("skipped")]
    if skipped:
        log(f"  skipped ({len(skipped)}): " + "; ".join(skipped)[:400])



def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", help="comma-separated batch sizes (default 8,16,32,64; smoke 2,4)")
    parser.add_argument("--max-case-s", type=float, default=6.0,
                        help="skip a case predicted to take longer per call (default %(default)s)")


if __name__ == "__main__":
    sys.exit(run_check("loss", __doc__.split("\n\n")[0], check, summary, add_options, deadline=160.0))
