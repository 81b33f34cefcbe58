"""hpseg end to end through its real command line (``python -m hpseg``) on a device.

On a synthetic dataset with a random ``vit_tiny_p8``: demo, prepare, train with fp16 and with
bf16 AMP (the CPU: no AMP and bf16), cache + train from it, eval, predict on two images,
``hpseg.load(...).segment`` in Python; outputs, finite losses and devices checked; every
command's output in ``OUT/cli.txt``.

    python benchmarks/gpu_cli.py --device cuda --out DIR
    HF_HUB_OFFLINE=1 python benchmarks/gpu_cli.py --smoke --device cpu
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from common import log, python_env, run_check
from PIL import Image

import hpseg
from hpseg.checkpoints.store import read_torch_file
from hpseg.data import make_synthetic_dataset


def check(run) -> dict:
    deadline = run.deadline
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
            out = subprocess.run(command, cwd=work, env=python_env(), capture_output=True, text=True,
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
        make_synthetic_dataset(data, n_train=12, n_val=4, size=64, n_classes=4, seed=0)
        return "12 training + 4 validation images of 64 px"

    python_step("data", make_data)
    cli("prepare", ["prepare", *common, "--no-progress"],
        lambda output: f"{len(list((data / 'hpseg_prepared' / 'train_32' / 'images').iterdir()))} crop images")

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
        segmenter = hpseg.load(checkpoint, device=device)
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
    summary = json.loads((out / "predictions.json").read_text())
    labels = sorted((out / "labels").rglob("*.png"))
    assert len(labels) == len(images), f"{len(labels)} label maps for {len(images)} images"
    for image in images:
        label = next(p for p in labels if p.name == image.name)
        assert np.array(Image.open(label)).shape == Image.open(image).size[::-1], "label map size"
    assert len(list((out / "figures").rglob("*.png"))) == len(images), "figures missing"
    return f"{len(labels)} label maps at the images' size, figures, predictions.json ({len(summary)} keys)"



def summary(run) -> None:
    steps = run.results.get("steps", [])
    log(f"cli: {run.results.get('passed')} steps ok: " + ", ".join(
        f"{r['step']} {'ok' if r['ok'] else 'FAIL'} {r['seconds']:.0f}s" for r in steps))
    for r in steps:
        if not r["ok"]:
            log(f"  FAIL {r['step']}: {r['detail'][:200]}")


if __name__ == "__main__":
    sys.exit(run_check("cli", __doc__.split("\n\n")[0], check, summary, deadline=150.0))
