"""Segmenting on the CPU: hpseg's PyTorch path against the exported ONNX model in onnxruntime,
images per second and peak memory side by side in one run.

The parent builds a segmenter on a registered backbone (random weights: speed and memory do not
depend on their values; no download), with heads of the paper's size (D = 70, 27 classes), and
exports it to ONNX. Each runtime then runs in a fresh subprocess, so its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own: the PyTorch child imports torch and hpseg;
the ONNX child runs ``hpseg.export.onnx_runner`` with torch blocked (numpy, Pillow, onnxruntime
only). Both segment the same synthetic images with ``hpseg predict``'s geometry (shorter side
resized to ``--size``, sliding windows of that size), one warm-up image first, with the same
number of threads. The load average is printed: on a shared machine other processes inflate
the times.

    python benchmarks/onnx_benchmark.py                              # dino_vits16, 320 px, 6 images
    python benchmarks/onnx_benchmark.py --backbone dino_vits8 --images 4 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _images(n: int, size: int) -> list:
    """Synthetic 4:3 photos of ``size`` x 4/3 ``size`` pixels (two windows each)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)) for _ in range(n)]


def build_segmenter(backbone: str, size: int):
    import torch

    from hpseg.backbones import create_backbone
    from hpseg.inference.segmenter import Segmenter
    from hpseg.inference.tiling import Tiling
    from hpseg.method.model import HiddenPositivesModel

    net = create_backbone(backbone, pretrained=False)
    torch.manual_seed(0)
    model = HiddenPositivesModel(net.embed_dim, 70, 27)
    return Segmenter(model, net, class_names=[f"class {k}" for k in range(27)],
                     tiling=Tiling.create(size, None, net.patch_size), device=torch.device("cpu"), batch_size=2)


def child(args: argparse.Namespace) -> None:
    """Segment the images with one runtime; print one JSON line."""
    if args.runtime == "torch":
        import torch

        torch.set_num_threads(args.threads)
        segmenter = build_segmenter(args.backbone, args.size)
    else:
        from hpseg.export.onnx_runner import OnnxSegmenter

        segmenter = OnnxSegmenter(args.model, threads=args.threads, batch_size=2)
    images = _images(args.images + 1, args.size)
    segmenter.segment(images[0])  # warm-up: lazy initialisation, allocator pools
    start, cpu = time.perf_counter(), time.process_time()
    for image in images[1:]:
        segmenter.segment(image)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"runtime": args.runtime, "images_per_s": args.images / wall, "wall_s": wall, "cpu_s": cpu,
                      "peak_rss_mb": peak_mb, "torch_imported": "torch" in sys.modules}))


def run_child(runtime: str, args: argparse.Namespace, model: Path, scratch: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    if runtime == "onnx":  # prove the ONNX path needs no torch: importing it fails in that child
        blocker = scratch / "no-torch" / "torch"
        blocker.mkdir(parents=True, exist_ok=True)
        (blocker / "__init__.py").write_text("raise ImportError('blocked by the benchmark')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), env["PYTHONPATH"]])
    command = [sys.executable, __file__, "--child", runtime, "--model", str(model), "--backbone", args.backbone,
               "--size", str(args.size), "--images", str(args.images), "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="dino_vits16")
    parser.add_argument("--size", type=int, default=320, help="shorter side and window (default 320, the presets')")
    parser.add_argument("--images", type=int, default=6, help="timed images (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", choices=("torch", "onnx"), dest="runtime", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runtime:
        return child(args)
    with tempfile.TemporaryDirectory() as scratch:
        # Export in a child too, so the parent stays small and the children's RSS are their own.
        model = Path(scratch) / "model.onnx"
        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
                "from onnx_benchmark import build_segmenter\nfrom hpseg.export.onnx import export_onnx\n"
                f"export_onnx(build_segmenter({args.backbone!r}, {args.size}), {str(model)!r})")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        export_s = time.perf_counter() - start
        results = [run_child(runtime, args, model, Path(scratch)) for runtime in ("torch", "onnx")]
        size_mb = model.stat().st_size / 2**20
    print(f"{args.backbone}, {args.images} images of {args.size}x{args.size * 4 // 3} (shorter side {args.size}, "
          f"windows {args.size}), {args.threads} threads; export {export_s:.0f} s, model {size_mb:.0f} MB; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'runtime':<14} {'images/s':>9} {'CPU s/image':>12} {'peak RSS MB':>12} {'torch imported':>15}")
    for r in results:
        name = "PyTorch" if r["runtime"] == "torch" else "ONNX Runtime"
        print(f"{name:<14} {r['images_per_s']:>9.2f} {r['cpu_s'] / args.images:>12.2f} {r['peak_rss_mb']:>12.0f} "
              f"{str(r['torch_imported']):>15}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "export_s": export_s, "model_mb": size_mb,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
