"""Images per second of ``hpseg predict``'s and ``hpseg eval``'s backbone paths on the CPU, the
one-image path and the batched path side by side in one process.

- **predict**: the same synthetic photos (mixed aspect ratios: 4:3, 3:4, 1:1, 16:9, at
  ``--photo`` pixels on the shorter side) through ``Segmenter.segment`` one image at a time
  (the path before: each image's windows in their own backbone passes) and through
  ``Segmenter.segment_many`` (the windows of consecutive images share passes of
  ``--batch-size`` windows, what ``hpseg predict`` runs now); predict's geometry (shorter side
  resized to ``--size``, windows of ``--size``). The label maps of the two paths are compared.
- **eval**: ``evaluate_model`` (what ``hpseg eval`` runs) on synthetic ``--size`` validation
  crops, with 1 image per backbone pass and with ``--eval-batch`` (``hpseg eval``'s default 8).

A registered backbone with random weights (speed does not depend on their values; no
download), heads of the paper's size (D = 70, 27 classes). The two paths of each pair alternate
for ``--repeats`` rounds after one warm-up and the median is reported; the load average is
printed, since on a shared machine other processes inflate the times.

    HF_HUB_OFFLINE=1 python benchmarks/predict_throughput.py                 # dino_vits16, 320 px
    HF_HUB_OFFLINE=1 python benchmarks/predict_throughput.py --backbone dino_vits8 --size 160 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from onnx_benchmark import build_segmenter
from PIL import Image

from hpseg.evaluation.protocol import evaluate_model
from hpseg.inference.tiling import resized_shape

#: (height, width) proportions of the synthetic photos: landscape 4:3, portrait 3:4, square, 16:9 (width:height).
ASPECTS = ((3, 4), (4, 3), (1, 1), (9, 16))


def photos(n: int, shorter: int) -> list[Image.Image]:
    """``n`` random photos cycling through :data:`ASPECTS`, ``shorter`` pixels on the shorter side."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = ASPECTS[i % len(ASPECTS)]
        height, width = shorter * h // min(h, w), shorter * w // min(h, w)
        out.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    return out


def validation_batches(n: int, size: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """``n`` synthetic validation crops as :class:`hpseg.data.ValCrops` batches of ``batch``."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=generator)
    labels = torch.randint(0, 27, (n, size, size), generator=generator)
    return [{"image": images[i:i + batch], "label": labels[i:i + batch],
             "rgb": torch.zeros(min(batch, n - i), 3, size, size, dtype=torch.uint8)} for i in range(0, n, batch)]


def alternate(paths: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each path, one warm-up each, then ``repeats`` rounds taking the paths in turn."""
    for run in paths.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="dino_vits16")
    parser.add_argument("--size", type=int, default=320, help="shorter side and window (default 320, the presets')")
    parser.add_argument("--photo", type=int, default=480, help="the photos' shorter side before resizing")
    parser.add_argument("--images", type=int, default=8, help="photos / validation crops per timed round")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per backbone pass (predict's default 8)")
    parser.add_argument("--eval-batch", type=int, default=8, help="validation images per pass (eval's default 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    segmenter = build_segmenter(args.backbone, args.size)
    segmenter.batch_size = args.batch_size
    images = photos(args.images, args.photo)
    tiling = segmenter.tiling
    windows = sum(len(tiling.windows(*tiling.padded(*resized_shape(im.height, im.width, args.size)))[1]) for im in images)
    one = [segmenter.segment(image) for image in images]
    many = list(segmenter.segment_many(images))
    same = all(np.array_equal(a, b) for a, b in zip(one, many))

    predict = alternate({
        "one image per call (segment)": lambda: [segmenter.segment(image) for image in images],
        "windows of several images (segment_many)": lambda: list(segmenter.segment_many(images)),
    }, args.repeats)
    device = torch.device("cpu")
    eval_paths = {}
    for batch in (1, args.eval_batch):
        batches = validation_batches(args.images, args.size, batch)
        eval_paths[f"evaluate_model, {batch} image(s) per pass"] = (
            lambda batches=batches: evaluate_model(segmenter.model, segmenter.backbone, batches, 27, device))
    evaluation = alternate(eval_paths, args.repeats)

    print(f"{args.backbone} (random weights), {args.threads} threads, size {args.size}, {args.images} photos "
          f"({args.photo} px shorter side, aspects {', '.join(f'{w}:{h}' for h, w in ASPECTS)} width:height; {windows} windows), "
          f"predict batch {args.batch_size} windows; load average {os.getloadavg()[0]:.2f}")
    print(f"label maps of the two predict paths equal: {same}")
    print(f"{'path':<44} {'median s':>9} {'images/s':>9}   rounds s")
    results = {}
    for name, seconds in {**predict, **evaluation}.items():
        median = statistics.median(seconds)
        results[name] = {"seconds": seconds, "median_s": median, "images_per_s": args.images / median}
        print(f"{name:<44} {median:>9.2f} {args.images / median:>9.2f}   {', '.join(f'{s:.2f}' for s in seconds)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "windows": windows, "labels_equal": same,
                                               "load_average": os.getloadavg()[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
