"""Training step time and peak memory: backbone features vs the feature cache (``hpseg cache``).

For each backbone / crop size / batch size / α it measures, in a fresh child process each (so
that peak resident memory is that configuration's own):

* ``backbone``: :class:`hpseg.training.features.BackboneFeatures` — the frozen ViT runs with attention
  capture on every batch, then the §4 processing of the attention;
* ``cache``: :class:`hpseg.training.cache.CachedFeatures` — f and the LHP weights read from the cache
  (float16 features), the backbone only for the photometric view when α > 0.

A step is timed from fetching its inputs (reading crops, or the cache) to the optimiser update,
i.e. ``next(steps)`` + :func:`hpseg.training.step.training_step` (with its contrast draw); the first
``--warmup`` steps are not timed.
Both wall-clock and CPU time (``time.process_time``) are recorded; with ``--threads 1`` (the
default) CPU time is the compute time and hardly depends on other processes sharing the machine,
so it is the better number on a busy host (GPU runs: use wall-clock).
Threshold pools are built before the timed steps (not timed). Memory: on the CPU the peak
resident set of the steps alone (the kernel's high-water mark ``VmHWM``, reset through
``/proc/self/clear_refs`` once the pools are built) and its growth over the resident set
before the first step; on CUDA ``torch.cuda.max_memory_allocated`` over the steps.

The backbones are randomly initialised (``pretrained=False``): speed and memory do not depend
on the weights. Data: a synthetic folder dataset, five-cropped at the crop size.

    python benchmarks/train_step_benchmark.py                       # tiny ViT 32 px + ViT-S/8 224 px
    python benchmarks/train_step_benchmark.py --configs dino_vits8:224:4,8 --alphas 0.05 --steps 3

GPU options (``benchmarks/gpu_step.py`` uses them for the paper-scale step):
``--num-workers N`` reads and augments the crops in N loader processes (default 0: in the
step's own process, which on a GPU can dominate the step); ``--full-pools`` fills the threshold
pools to ``method.pool_size`` (2048) rows by drawing further random patches from one pass over a
dataset that has fewer crops than that, so the pool thresholds cost what they cost at full scale
without thousands of crops; ``--time-loss`` also times the GHP + LHP loss call inside each step
(device synchronised around it: its gradient is computed in that call, backward only scales it);
``--loss-backend NAME`` sets ``method.loss_backend`` (default auto).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CONFIGS = "vit_tiny_p8:32:8,32;dino_vits8:224:4,8"


def prepare(work: Path, crop_size: int, n_images: int) -> Path:
    from hpseg.data import build_raw_dataset, make_synthetic_dataset, prepare_five_crops

    root = work / f"data_{crop_size}"
    if not (root / "hpseg_prepared" / f"train_{crop_size}" / "manifest.json").exists():
        make_synthetic_dataset(root, n_train=n_images, n_val=2, size=max(64, crop_size * 2), n_classes=4, seed=0)
        raw = build_raw_dataset("folder", root, "train")
        prepare_five_crops(raw, root / "hpseg_prepared" / f"train_{crop_size}", crop_size=crop_size)
    return root


def overrides(name: str, root: Path, crop_size: int, batch: int, alpha: float, device: str, cache: str,
              num_workers: int = 0, loss_backend: str = "auto") -> list[str]:
    return [f"method.loss_backend={loss_backend}",
        f"backbone.name={name}", "backbone.pretrained=false", "data.dataset=folder", f"data.root={root}",
        f"data.crop_size={crop_size}", f"data.num_workers={num_workers}", f"data.feature_cache={cache}",
        f"train.batch_size={batch}", f"method.alpha={alpha}", f"train.device={device}",
        "method.n_classes=4",  # the synthetic data's classes (a mismatch stops training)
    ]


def build_cache(name: str, root: Path, crop_size: int, device: str) -> dict:
    """Build the cache the way `hpseg cache` does (random backbones are seeded: the trainer's is the same)."""
    import torch

    from hpseg.backbones import create_backbone
    from hpseg.config import load_preset
    from hpseg.runtime import amp_dtype, resolve_device
    from hpseg.training.cache import build_feature_cache, default_cache_dir

    config = load_preset("cocostuff27").override(overrides(name, root, crop_size, 8, 0.0, device, "auto"))
    dev = resolve_device(device)
    backbone = create_backbone(name, pretrained=False).to(dev)
    out = default_cache_dir(config.data.prepared_path(), name)
    shutil.rmtree(out, ignore_errors=True)  # time a full build
    started, cpu_started = time.perf_counter(), time.process_time()
    build_feature_cache(backbone, config.data.prepared_path(), out, sigma=config.method.sigma, batch_size=8,
                        device=dev, amp_dtype=amp_dtype(config.train.amp, dev), overwrite=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    meta = json.loads((out / "meta.json").read_text())
    size = sum((out / meta[k]["file"]).stat().st_size for k in ("features", "neighbour_weights"))
    return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
            "crops": meta["data"]["n_crops"], "bytes": size}


def build_pools(trainer, full: bool) -> dict:
    """The trainer's threshold pools; ``full``: filled to method.pool_size rows even from few crops.

    With fewer crops than the pool size, one pass over the data gives a smaller pool (one patch
    per crop). ``full`` keeps that pass's feature maps and lets the trainer's own pool builders
    cycle over them, each cycle drawing another random patch per crop.
    """
    import itertools

    from hpseg.training.pools import ThresholdPools, pool_batches

    features = trainer.features
    if full:
        batches = pool_batches(len(features), trainer.config.train.batch_size, trainer.config.method.pool_size,
                               trainer.state.pool_generator)
        maps = list(features.feature_maps(batches))
        features.feature_maps = lambda batches: itertools.cycle(maps)  # instance attribute: shadows the method
    try:
        agnostic = trainer.build_agnostic_pool()
        trainer.state.pools = ThresholdPools(agnostic, trainer.build_specific_pool())
    finally:
        if full:
            del features.feature_maps
    return {"pool_agnostic_rows": trainer.state.pools.agnostic.shape[0],
            "pool_specific_rows": trainer.state.pools.specific.shape[0]}


def _timed_loss(original, times: list, cuda: bool):
    """The HP loss's forward, timed with the device synchronised before and after each call."""
    import torch

    def timed(*args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = original(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return out

    return timed


def child(spec: dict) -> dict:
    """One configuration, in this process."""
    import torch

    from hpseg.config import load_preset
    from hpseg.training.step import draw_contrast, training_step
    from hpseg.training.trainer import Trainer

    config = load_preset("cocostuff27").override(
        overrides(spec["name"], Path(spec["root"]), spec["crop"], spec["batch"], spec["alpha"], spec["device"],
                  "auto" if spec["mode"] == "cache" else "off", spec.get("num_workers", 0),
                  spec.get("loss_backend", "auto"))
    )
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir))
        expected = "CachedFeatures" if spec["mode"] == "cache" else "BackboneFeatures"
        assert type(trainer.features).__name__ == expected, type(trainer.features).__name__
        cuda = trainer.device.type == "cuda"
        pools = build_pools(trainer, spec.get("full_pools", False))
        loss_times: list[float] = []
        if spec.get("time_loss"):
            loss = trainer.learner.loss
            loss.forward = _timed_loss(loss.forward, loss_times, cuda)  # instance attribute: shadows the method
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(trainer.device)
            before = torch.cuda.memory_allocated(trainer.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = _proc_status("VmRSS")
        n_steps = spec["warmup"] + spec["steps"]
        steps = (inputs for epoch in range(100) for inputs in trainer._epoch_steps(epoch, 0))
        fetch, total, cpu, hp_values, loss_timed = [], [], [], [], []
        for i in range(n_steps):
            if cuda:
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            inputs = next(steps)
            if cuda:
                torch.cuda.synchronize()
            got = time.perf_counter()
            batch, _, height, width = inputs.features.shape
            draw = draw_contrast(config.method, height * width, batch * height * width, trainer.state.contrast_generator,
                                 trainer.device)
            values = training_step(trainer.learner, inputs, trainer.state.pools, draw, 0.5)
            if cuda:
                torch.cuda.synchronize()
            end, cpu_end = time.perf_counter(), time.process_time()
            hp_values.append(values["hp"])
            if i >= spec["warmup"]:
                fetch.append(got - start)
                total.append(end - start)
                cpu.append(cpu_end - cpu_start)
                if loss_times:
                    loss_timed.append(loss_times[-1])
        peak = torch.cuda.max_memory_allocated(trainer.device) if cuda else _proc_status("VmHWM")
    extra = {**pools, "hp_values": hp_values}
    if loss_timed:
        extra["loss_s"] = statistics.median(loss_timed)
    return {**spec, **extra, "step_s": statistics.median(total), "fetch_s": statistics.median(fetch),
            "cpu_s": statistics.median(cpu), "min_step_s": min(total), "peak_bytes": peak,
            "growth_bytes": peak - before, "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_kind": "cuda allocated" if cuda else "VmHWM of the steps"}


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_child(spec: dict) -> dict:
    threads = str(spec["threads"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{gpu}, Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="NAME:CROP:B1,B2;... backbone, crop size and batch sizes (default: %(default)s)")
    parser.add_argument("--alphas", default="0.05,0", help="consistency weights to measure (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--images", type=int, default=8, help="synthetic training images (x5 crops; 8 gives 40, one batch of 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time = compute time)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", help="work directory (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader processes (default 0)")
    parser.add_argument("--full-pools", action="store_true",
                        help="fill the threshold pools to method.pool_size rows even from fewer crops")
    parser.add_argument("--time-loss", action="store_true", help="also time the HP loss call inside each step")
    parser.add_argument("--loss-backend", default="auto", help="method.loss_backend of the runs (default: auto)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        import torch

        torch.set_num_threads(spec["threads"])
        print(json.dumps(child(spec)))
        return

    alphas = [float(a) for a in args.alphas.split(",")]
    work_context = tempfile.TemporaryDirectory() if not args.work else None
    work = Path(args.work or work_context.name)
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"command: python {' '.join(sys.argv)}")
    rows, builds = [], {}
    for entry in args.configs.split(";"):
        name, crop, sizes = entry.split(":")
        crop = int(crop)
        root = prepare(work, crop, args.images)
        builds[(name, crop)] = build_cache(name, root, crop, args.device)
        b = builds[(name, crop)]
        print(f"cache build {name} {crop}px: {b['crops']} crops in {b['seconds']:.2f} s wall, "
              f"{b['cpu_seconds']:.2f} s CPU ({b['crops'] / b['cpu_seconds']:.2f} crops per CPU second), "
              f"{b['bytes'] / 2**20:.2f} MiB", flush=True)
        for batch in (int(s) for s in sizes.split(",")):
            for alpha in alphas:
                for mode in ("backbone", "cache"):
                    spec = {"name": name, "crop": crop, "batch": batch, "alpha": alpha, "mode": mode,
                            "root": str(root), "device": args.device, "steps": args.steps, "warmup": args.warmup,
                            "threads": args.threads, "num_workers": args.num_workers,
                            "full_pools": args.full_pools, "time_loss": args.time_loss,
                            "loss_backend": args.loss_backend}
                    result = run_child(spec)
                    rows.append(result)
                    print(f"  {name} {crop}px B={batch} alpha={alpha} {mode}: step {result['cpu_s']:.3f} s CPU, "
                          f"{result['step_s']:.3f} s wall (inputs {result['fetch_s']:.3f} s wall"
                          + (f", HP loss {result['loss_s']:.3f} s" if "loss_s" in result else "") + "), "
                          f"peak {result['peak_bytes'] / 2**20:.0f} MiB (+{result['growth_bytes'] / 2**20:.0f} MiB "
                          "over the resident set before the steps)", flush=True)

    print()
    print("| backbone | crop | batch | α | step CPU s, backbone | step CPU s, cache | ratio | step wall s, backbone "
          "| step wall s, cache | inputs wall s, backbone | inputs wall s, cache | step peak MiB, backbone "
          "| step peak MiB, cache |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        live, cached = rows[i], rows[i + 1]
        print(f"| {live['name']} | {live['crop']} | {live['batch']} | {live['alpha']:g} | {live['cpu_s']:.3f} | "
              f"{cached['cpu_s']:.3f} | {live['cpu_s'] / cached['cpu_s']:.1f}x | {live['step_s']:.3f} | "
              f"{cached['step_s']:.3f} | {live['fetch_s']:.3f} | {cached['fetch_s']:.3f} | "
              f"{live['peak_bytes'] / 2**20:.0f} (+{live['growth_bytes'] / 2**20:.0f}) | "
              f"{cached['peak_bytes'] / 2**20:.0f} (+{cached['growth_bytes'] / 2**20:.0f}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows,
                                               "builds": {f"{k[0]}:{k[1]}": v for k, v in builds.items()}}, indent=1))
    if work_context is not None:
        work_context.cleanup()


if __name__ == "__main__":
    main()
