"""GHP + LHP loss: hpseg against the reference-style baseline, time and peak memory side by side.

Every (implementation, batch) case runs in a fresh subprocess, so its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the parent never imports torch (a child's
ru_maxrss starts from its parent's RSS at the fork). The child imports torch, runs the loss
once on a tiny input (libraries are loaded lazily), records its peak RSS (the "base"), builds
the inputs, runs forward + backward ``--warmup`` times and then ``--repeats`` times, and reports
the median wall time, the median process CPU time, the peak RSS and the peak minus the base
("net": inputs, gradients and everything the loss holds). The load average of the machine is
printed with the results: on a shared machine, other processes inflate the times, most of all
with several threads.

Inputs are synthetic but shaped like the method's: ``side x side`` patches per image, patch
features drawn around 27 class prototypes plus a per-segment component (so that patches of a
segment in the same image are similar, as with DINO features), pools of one random patch per
"image". The printed densities say how many pairs were positives / in the contrast set.

    python benchmarks/loss_benchmark.py                      # batches 2 4 8 16, both
    python benchmarks/loss_benchmark.py --paper-scale        # adds hpseg at batch 64 (N = 50,176)
    python benchmarks/loss_benchmark.py --batch-sizes 4 8 --repeats 5 --threads 2 --json out.json

The baseline is never run at paper scale: it would keep about 80 GB of (hw x N) matrices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLEMENTATIONS = ("baseline", "hpseg")
PAPER_BATCH = 64


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def _current_rss_gb() -> float:
    """The resident set now (not its peak), from /proc; 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except OSError:
        return 0.0


# Strengths of the per-segment, smooth per-image and per-patch parts of a feature (class prototype: 1).
INSTANCE, FIELD, NOISE = 0.5, 0.5, 0.5


def synthetic_inputs(args: argparse.Namespace, batch: int) -> dict:
    """Inputs of one step: z, z_mix (N, D), f (N, C), s' (N, D), pools, shared (hw, N) pattern."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(args.seed)
    hw = args.side**2
    n = batch * hw
    n_classes, segments = 27, 3
    # Each image: 3 Voronoi segments of the patch grid, each with a class and its own instance id.
    ys, xs = torch.meshgrid(torch.arange(args.side), torch.arange(args.side), indexing="ij")
    grid = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()  # (hw, 2)
    seeds = torch.rand(batch, segments, 2, generator=g) * args.side
    segment = torch.cdist(grid[None].expand(batch, -1, -1), seeds).argmin(-1)  # (B, hw)
    classes = torch.randint(n_classes, (batch, segments), generator=g)
    labels = classes.gather(1, segment).reshape(-1)
    instances = (torch.arange(batch)[:, None] * segments + segment).reshape(-1)

    # A smooth field per image (a few low-frequency waves): near patches are more alike than far ones.
    waves = 4
    frequencies = torch.randn(batch, waves, 2, generator=g) * (2 * torch.pi / args.side)
    phases = torch.rand(batch, waves, 1, generator=g) * 2 * torch.pi
    wave_values = torch.cos(frequencies @ grid.T + phases) * (2 / waves) ** 0.5  # (B, waves, hw)

    def features(width: int, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        # In place where it can be: at paper scale every (N, width) temporary is 100 MB.
        prototypes = torch.randn(n_classes, width, generator=g)
        x = torch.randn(n, width, generator=g).mul_(NOISE)
        x += prototypes[labels]
        x.add_(torch.randn(batch * segments, width, generator=g)[instances], alpha=INSTANCE)
        waves_to_features = torch.randn(batch, waves, width, generator=g)
        x.view(batch, hw, width).baddbmm_(wave_values.transpose(1, 2), waves_to_features, alpha=FIELD)
        # Pool: one patch of each of pool_size other images (own class, instance and field).
        pool = prototypes[torch.randint(n_classes, (pool_size,), generator=g)]
        pool += (INSTANCE**2 + FIELD**2 + NOISE**2) ** 0.5 * torch.randn(pool_size, width, generator=g)
        return x.div_(x.norm(dim=1, keepdim=True)), F.normalize(pool, dim=1)

    f, pool_ag = features(args.feature_dim, args.pool)
    s_ema, pool_sp = features(args.dim, args.pool)
    z, z_mix = (
        F.normalize(torch.randn(n, args.dim, generator=g).mul_(0.5).add_(s_ema), dim=1) for _ in range(2)
    )
    pattern = torch.rand(hw, n, generator=g) < args.rho
    return dict(z=z, z_mix=z_mix, f=f, s_ema=s_ema, pool_ag=pool_ag, pool_sp=pool_sp, pattern=pattern, hw=hw)


def loss_function(implementation: str, args: argparse.Namespace, matmul_dtype=None, backend="auto"):
    """A callable (z, z_mix, inputs) -> scalar loss for the implementation.

    ``matmul_dtype`` and ``backend`` (hpseg only): the dtype of its products (default: the loss's,
    float32) and its ``LossBackend`` or its name.
    """
    if implementation == "baseline":
        from reference_style_loss import reference_style_loss

        def run(z, z_mix, x):
            return reference_style_loss(
                z, z_mix, x["f"], x["s_ema"], x["pool_ag"], x["pool_sp"], x["pattern"],
                patches_per_image=x["hw"], lmbd=args.lmbd, tau=args.tau,
            )
    else:
        from hpseg.method import SharedContrastPattern, hidden_positive_loss

        options = {"backend": backend} | ({} if matmul_dtype is None else {"matmul_dtype": matmul_dtype})

        def run(z, z_mix, x):
            return hidden_positive_loss(
                z, z_mix, x["f"], x["s_ema"], x["pool_ag"], x["pool_sp"], patches_per_image=x["hw"],
                contrast_draw=SharedContrastPattern(x["pattern"]), lmbd=args.lmbd, tau=args.tau, **options,
            )
    return run


def densities(x: dict, args: argparse.Namespace) -> dict:
    """Fractions of pairs that are TA, TS and contrast pairs: anchors of the first 8 images x all N."""
    import torch

    from hpseg.method.positives import PositiveInputs, SharedContrastPattern

    inputs = PositiveInputs.build(
        x["f"], x["s_ema"], x["pool_ag"], x["pool_sp"], x["hw"], SharedContrastPattern(x["pattern"])
    )
    n = inputs.n_patches
    counts = torch.zeros(3, dtype=torch.float64)
    anchors = min(n, 8 * x["hw"])
    for start in range(0, anchors, x["hw"]):
        m = inputs.masks(start, start + x["hw"])
        counts += torch.tensor([m.task_agnostic.sum(), m.task_specific.sum(), m.contrast.sum()], dtype=torch.float64)
    return dict(zip(("task_agnostic", "task_specific", "contrast"), (counts / (anchors * n)).tolist()))


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    run = loss_function(args.child, args)
    tiny = synthetic_inputs(argparse.Namespace(**{**vars(args), "side": 4, "pool": 16}), 2)
    run(tiny["z"].requires_grad_(), tiny["z_mix"].requires_grad_(), tiny).backward()
    del tiny
    base, base_now = _rss_gb(), _current_rss_gb()
    x = synthetic_inputs(args, args.child_batch)
    z, z_mix = x["z"].requires_grad_(), x["z_mix"].requires_grad_()
    inputs = _current_rss_gb() - base_now  # what the inputs hold, part of both implementations' net peak
    times, cpu_times, value = [], [], None
    for step in range(args.warmup + args.repeats):
        t, c = time.perf_counter(), time.process_time()
        loss = run(z, z_mix, x)
        loss.backward()
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
        value = loss.item()
        z.grad = z_mix.grad = None
        del loss
        if step >= args.warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    peak = _rss_gb()
    result = dict(
        implementation=args.child, batch=args.child_batch, n=x["z"].shape[0], threads=args.threads,
        times_s=times, median_s=statistics.median(times), cpu_times_s=cpu_times,
        median_cpu_s=statistics.median(cpu_times), rss_base_gb=base, rss_peak_gb=peak, rss_net_gb=peak - base,
        rss_inputs_gb=inputs,
        loss=value, load_average=os.getloadavg(),
    )
    if args.child_densities:
        result["densities"] = densities(x, args)
    print("RESULT " + json.dumps(result), flush=True)


def _child_command(args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable, __file__, "--threads", str(args.threads), "--rho", str(args.rho), "--lmbd", str(args.lmbd),
        "--tau", str(args.tau), "--side", str(args.side), "--dim", str(args.dim),
        "--feature-dim", str(args.feature_dim), "--pool", str(args.pool), "--seed", str(args.seed), *extra,
    ]


def _run_child(command: list[str], args: argparse.Namespace, what: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["wall_s"] = time.perf_counter() - started
    return result


def run_case(args: argparse.Namespace, implementation: str, batch: int, repeats: int, warmup: int, dens: bool) -> dict:
    command = _child_command(
        args, "--child", implementation, "--child-batch", str(batch), "--repeats", str(repeats),
        "--warmup", str(warmup), *(["--child-densities"] if dens else []),
    )
    return _run_child(command, args, f"{implementation} at batch {batch}")


def hpseg_on_golden(g: dict, device="cpu", matmul_dtype=None, backend="auto"):
    """hpseg's loss and gradients of z and z_mix on one golden case (``golden_cases``), on ``device``,
    through ``backend`` (a ``LossBackend`` or its name)."""
    from hpseg.method import SharedContrastPattern, hidden_positive_loss

    g = {key: value.to(device) for key, value in g.items()}
    z, z_mix = g["z"].clone().requires_grad_(), g["z_mix"].clone().requires_grad_()
    loss = hidden_positive_loss(
        z, z_mix, g["f"], g["s_ema"], g["pool_ag"], g["pool_sp"], patches_per_image=int(g["side"]) ** 2,
        contrast_draw=SharedContrastPattern.from_uniform(g["uniform"], float(g["rho"])),
        lmbd=float(g["lmbd"]), tau=float(g["tau"]), tau_base=float(g["base_tau"]),
        reweighting=bool(g["reweighting"]), backend=backend,
        **({} if matmul_dtype is None else {"matmul_dtype": matmul_dtype}),
    )
    loss.backward()
    return loss.detach(), z.grad, z_mix.grad


def check_hpseg_paths_against_golden() -> None:
    """hpseg on the golden files with every tile through the dense, then the sparse products."""
    from reference_style_loss import assert_matches_golden, golden_cases

    for backend in ("torch-dense", "torch-sparse"):
        for name, g in golden_cases():
            assert_matches_golden(f"{name} ({backend})", g, *hpseg_on_golden(g, backend=backend))


def check_correctness(args: argparse.Namespace) -> None:
    """The baseline against the golden files, and hpseg against the baseline on synthetic inputs."""
    import torch
    from reference_style_loss import check_against_golden

    count = check_against_golden()
    check_hpseg_paths_against_golden()
    x = synthetic_inputs(args, 2)
    grads = {}
    for implementation in IMPLEMENTATIONS:
        z = x["z"].clone().requires_grad_()
        z_mix = x["z_mix"].clone().requires_grad_()
        loss = loss_function(implementation, args)(z, z_mix, x)
        loss.backward()
        grads[implementation] = (loss.detach(), z.grad, z_mix.grad)
    (a_loss, a_z, a_mix), (b_loss, b_z, b_mix) = grads["baseline"], grads["hpseg"]
    torch.testing.assert_close(b_loss, a_loss, rtol=1e-4, atol=1e-5)
    for a, b in ((a_z, b_z), (a_mix, b_mix)):
        assert (a - b).abs().max() <= 1e-3 * a.abs().max(), "hpseg and baseline gradients differ"
    model = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    info = dict(cpu=model, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                golden_files=count)
    print("RESULT " + json.dumps(info), flush=True)


def table(results: list[dict], paper: dict | None, args: argparse.Namespace) -> str:
    by = {(r["implementation"], r["batch"]): r for r in results}
    lines = [
        "| batch | N | time baseline / hpseg (s) | speed-up | CPU time baseline / hpseg (s) | CPU speed-up "
        "| peak net baseline / hpseg (GB) | memory ratio | inputs (GB) | peak RSS baseline / hpseg (GB) "
        "| TA / TS / contrast pairs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for batch in args.batch_sizes:
        a, b = by.get(("baseline", batch)), by.get(("hpseg", batch))
        if not (a and b):
            continue
        d = b.get("densities", {})
        dens = " / ".join(f"{100 * d[k]:.1f}%" for k in ("task_agnostic", "task_specific", "contrast")) if d else "-"
        lines.append(
            f"| {batch} | {b['n']:,} | {a['median_s']:.2f} / {b['median_s']:.2f} | {a['median_s'] / b['median_s']:.1f}x "
            f"| {a['median_cpu_s']:.2f} / {b['median_cpu_s']:.2f} | {a['median_cpu_s'] / b['median_cpu_s']:.1f}x "
            f"| {a['rss_net_gb']:.3f} / {b['rss_net_gb']:.3f} | {a['rss_net_gb'] / max(b['rss_net_gb'], 1e-3):.1f}x "
            f"| {b.get('rss_inputs_gb', float('nan')):.3f} | {a['rss_peak_gb']:.2f} / {b['rss_peak_gb']:.2f} | {dens} |"
        )
    text = "\n".join(lines)
    if paper:
        d = paper.get("densities", {})
        dens = ", ".join(f"{k} {100 * v:.2f}%" for k, v in d.items())
        text += (
            f"\n\nPaper scale (hpseg only, batch {paper['batch']}, N = {paper['n']:,}): "
            f"{paper['median_s']:.1f} s forward + backward ({paper['median_cpu_s']:.1f} s CPU), peak RSS "
            f"{paper['rss_peak_gb']:.2f} GB ({paper['rss_net_gb']:.2f} GB above the {paper['rss_base_gb']:.2f} GB base). "
            f"Pairs: {dens}. The baseline is not run there (about 80 GB of (hw x N) matrices)."
        )
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    parser.add_argument("--paper-scale", action="store_true", help="also run hpseg alone at batch 64 (N = 50,176)")
    parser.add_argument("--paper-repeats", type=int, default=1)
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--rho", type=float, default=0.02)
    parser.add_argument("--lmbd", type=float, default=0.5)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--side", type=int, default=28, help="patches per image side (28 for ViT-S/8 at 224 px)")
    parser.add_argument("--dim", type=int, default=512, help="D: segmentation / projection width")
    parser.add_argument("--feature-dim", type=int, default=384, help="C: backbone feature width")
    parser.add_argument("--pool", type=int, default=2048, help="threshold pool size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-densities", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.child_check:
        check_correctness(args)
        return

    info = _run_child(_child_command(args, "--child-check"), args, "the correctness check")
    print(f"checked: the baseline and hpseg (dense and sparse kernels) match {info.pop('golden_files')} golden "
          "files; hpseg matches the baseline at batch 2 (synthetic inputs)")
    info.pop("wall_s")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}; {args.threads} threads; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    results = []
    for batch in args.batch_sizes:
        for implementation in args.implementations:
            r = run_case(args, implementation, batch, args.repeats, args.warmup, dens=implementation == "hpseg")
            results.append(r)
            print(
                f"  {implementation:8s} batch {batch:3d} (N = {r['n']:6,}): median {r['median_s']:7.2f} s "
                f"{[round(t, 2) for t in r['times_s']]}, CPU {r['median_cpu_s']:7.2f} s, peak RSS "
                f"{r['rss_peak_gb']:.3f} GB (base {r['rss_base_gb']:.3f}, net {r['rss_net_gb']:.3f}), "
                f"loss {r['loss']:.4f}, load {r['load_average'][0]:.1f}", flush=True,
            )
    paper = None
    if args.paper_scale:
        paper = run_case(args, "hpseg", PAPER_BATCH, args.paper_repeats, 0, dens=True)
        results.append(paper)
        print(f"  hpseg    batch {PAPER_BATCH} (N = {paper['n']:,}): {paper['median_s']:.1f} s, "
              f"peak RSS {paper['rss_peak_gb']:.2f} GB (net {paper['rss_net_gb']:.2f} GB)", flush=True)
    print()
    print(table(results, paper, args))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if not k.startswith("child")}
        args.json.write_text(json.dumps(dict(machine=info, settings=settings, results=results), indent=2, default=str))


if __name__ == "__main__":
    main()
