"""Global hidden positives on W ranks: per-rank loss time and peak memory for a fixed global batch,
and the bytes each rank sends per step.

Every W runs as W fresh processes (gloo on the CPU, one thread each, ``torch.multiprocessing``)
that build the same synthetic global batch (``loss_benchmark.synthetic_inputs``: z, z^mix (N, D),
f (N, C), s' (N, D), pools, the shared pattern), keep their B/W images' rows, and time what a
training step does with them (``hpseg.training.step``): gather f, s', z, z^mix of the whole batch,
the loss of the rank's anchors against all N patches with its gradients, and the backward of the
gather (all-reduce on gloo, reduce-scatter on NCCL). Reported per rank: the median wall time of
the loss alone and of loss + communication, and the peak RSS above the RSS before the inputs
existed. The loss shares of the ranks are summed and checked against W = 1's loss.

    python benchmarks/distributed_scaling.py                     # B = 8 crops of 28 x 28, W = 1 2
    python benchmarks/distributed_scaling.py --batch 16 --worlds 1 2 4 --repeats 3

The communication at the paper's scale (B = 64, ViT-S/8: N = 50,176, C = 384, D = 512) is worked
out from the tensors' shapes and dtypes (printed with ``--bytes-only``).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from loss_benchmark import synthetic_inputs  # noqa: E402

# What one step gathers (forward) and reduce-scatters (backward), with the dtypes of the training
# step: f and s' as float32 rows (``step._embed``), z and z^mix float32 (``ProjectionHead``), the
# gradients of z and z^mix float32.
PAPER = {"batch": 64, "hw": 28 * 28, "C": 384, "D": 512}
LINKS = {"NVLink 4 (H100/H200, ~370 GB/s all-gather bus bandwidth)": 370e9, "100 Gb/s network": 12.5e9}


def paper_bytes(world_sizes: list[int]) -> str:
    n = PAPER["batch"] * PAPER["hw"]
    gathered = {"f (N x C)": n * PAPER["C"] * 4, "s' (N x D)": n * PAPER["D"] * 4,
                "z (N x D)": n * PAPER["D"] * 4, "z^mix (N x D)": n * PAPER["D"] * 4}
    scattered = {"grad z, z^mix (2 x N x D)": 2 * n * PAPER["D"] * 4}
    total = sum(gathered.values()) + sum(scattered.values())
    lines = [f"paper scale: B = {PAPER['batch']}, N = {n:,}, C = {PAPER['C']}, D = {PAPER['D']} (float32)"]
    for name, size in {**gathered, **scattered}.items():
        lines.append(f"  {name}: {size / 1e6:.1f} MB")
    lines.append(f"  all tensors of a step: {total / 1e6:.1f} MB; a ring all-gather / reduce-scatter sends "
                 "(W-1)/W of each from every rank")
    for w in world_sizes:
        sent = total * (w - 1) / w
        costs = ", ".join(f"{name}: {sent / bandwidth * 1e3:.1f} ms" for name, bandwidth in LINKS.items())
        lines.append(f"  W = {w}: {sent / 1e6:.1f} MB sent per rank per step; {costs}")
    return "\n".join(lines)


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from hpseg.method import SharedContrastPattern, hidden_positive_loss
    from hpseg.runtime import DistributedContext
    from hpseg.training import distributed

    torch.set_num_threads(1)
    context = DistributedContext(rank, world)
    if world > 1:
        dist.init_process_group("gloo")
    base = _current_rss_mb()
    x = synthetic_inputs(args, args.batch)
    hw, per_rank = x["hw"], args.batch // world
    own = slice(rank * per_rank * hw, (rank + 1) * per_rank * hw)
    z, z_mix, f, s_ema = (x[k][own].clone() for k in ("z", "z_mix", "f", "s_ema"))
    del x["z"], x["z_mix"], x["f"], x["s_ema"]
    draw = SharedContrastPattern(x["pattern"])
    images = distributed.rank_images(per_rank, context) if world > 1 else None
    loss_times, step_times, shares = [], [], []
    for _ in range(args.warmup + args.repeats):
        a, b = z.clone().requires_grad_(), z_mix.clone().requires_grad_()
        started = time.perf_counter()
        rows = (distributed.gather_with_gradients(a, context), distributed.gather_with_gradients(b, context),
                distributed.gather_rows(f, context), distributed.gather_rows(s_ema, context))
        loss_started = time.perf_counter()
        share = hidden_positive_loss(*rows, x["pool_ag"], x["pool_sp"], patches_per_image=hw, contrast_draw=draw,
                                     lmbd=args.lmbd, tau=args.tau, backend="torch", anchor_images=images)
        loss_time = time.perf_counter() - loss_started
        (share * world).backward()
        step_times.append(time.perf_counter() - started)
        loss_times.append(loss_time)
        shares.append(float(share.detach()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    keep = slice(args.warmup, None)
    Path(out, f"{world}-{rank}.txt").write_text(
        f"{statistics.median(loss_times[keep])} {statistics.median(step_times[keep])} {peak} {shares[-1]}")
    if world > 1:
        dist.destroy_process_group()


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="the global batch B (crops)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bytes-only", action="store_true")
    parser.add_argument("--side", type=int, default=28)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--feature-dim", type=int, default=384)
    parser.add_argument("--pool", type=int, default=2048)
    parser.add_argument("--rho", type=float, default=0.02)
    parser.add_argument("--lmbd", type=float, default=0.5)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(paper_bytes([2, 8, 16]))
    if args.bytes_only:
        return
    import torch.multiprocessing as mp

    print(f"\nB = {args.batch} crops of {args.side} x {args.side} patches (N = {args.batch * args.side**2:,}), "
          f"C = {args.feature_dim}, D = {args.dim}, torch path, float32, one thread per rank; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("W | loss per rank (s) | loss + communication (s) | peak RSS above start (MB) | loss (sum of shares)")
    with tempfile.TemporaryDirectory() as out:
        for world in args.worlds:
            if args.batch % world:
                raise SystemExit(f"--batch {args.batch} does not divide over {world} ranks")
            mp.start_processes(_rank, args=(world, _free_port(), args, out), nprocs=world, start_method="spawn")
            rows = [list(map(float, Path(out, f"{world}-{r}.txt").read_text().split())) for r in range(world)]
            loss_time = max(r[0] for r in rows)
            step_time = max(r[1] for r in rows)
            peak = max(r[2] for r in rows)
            print(f"{world} | {loss_time:.2f} | {step_time:.2f} | {peak:.0f} | {sum(r[3] for r in rows):.6f}")


if __name__ == "__main__":
    main()
