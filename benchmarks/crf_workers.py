"""The CRF evaluation with 1, 2 and all CRF workers, side by side in one run (issue 24).

Runs ``hpseg.evaluation.protocol.evaluate_model(..., crf=True, crf_workers=W)`` — what
``hpseg eval --crf --crf-workers W`` runs — on the same N synthetic validation images for
W = 0 (the serial path, in this process), 1, 2 and all the cores available to this process,
in alternating order, and reports the seconds, images per second, the speed-up over the serial
path and per worker, and whether every setting gave the serial path's results exactly
(confusion matrices, matched assignment, per-class IoU). It also times one dense CRF of one
image and head (the per-image cost the projection in BENCHMARKS.md starts from), and the CPU time of this
process and of the workers per image (``getrusage``: on a shared machine the wall clock also
measures the other users, the CPU time much less).

The backbone is the tiny random ViT (``vit_tiny_p8``), so that the CRF dominates as it does on a
GPU machine, where the ViT-S/8 backbone's share of an image is milliseconds; 27 clusters and 27
classes, images ``--size`` px (the paper's 320), 10 mean-field iterations.

    python benchmarks/crf_workers.py                    # 8 images, 320 px
    python benchmarks/crf_workers.py --images 4 --size 160 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import numpy as np
import torch

from hpseg.backbones import create_backbone
from hpseg.evaluation.protocol import evaluate_model
from hpseg.inference.crf import dense_crf
from hpseg.method.model import HiddenPositivesModel
from hpseg.runtime import available_cores


def synthetic_batches(n_images: int, size: int, batch_size: int, n_classes: int) -> list[dict[str, torch.Tensor]]:
    """Images of a few smooth regions (so the CRF has edges to follow) and their labels."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, n_images, batch_size):
        count = min(batch_size, n_images - start)
        coarse = torch.randint(0, n_classes, (count, 1, 5, 5), generator=generator).float()
        labels = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()
        colours = torch.randint(0, 256, (n_classes, 3), generator=generator)
        rgb = colours[labels].permute(0, 3, 1, 2).to(torch.uint8)
        noise = torch.randint(-20, 21, rgb.shape, generator=generator)
        rgb = (rgb.int() + noise).clamp(0, 255).to(torch.uint8)
        image = (rgb.float() / 255 - 0.45) / 0.225
        batches.append({"image": image, "rgb": rgb, "label": labels})
    return batches


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def one_crf_seconds(size: int, n_labels: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    logits = rng.normal(size=(n_labels, size, size)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    times = []
    for _ in range(repeats):
        start = time.process_time()  # CPU time: on a shared machine the wall clock measures the others too
        dense_crf(image, probs)
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting (the minimum is reported)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cores = available_cores()
    backbone = create_backbone("vit_tiny_p8", pretrained=False).eval()
    model = HiddenPositivesModel(feature_dim=backbone.embed_dim, dim=32, n_classes=args.classes).eval()
    batches = synthetic_batches(args.images, args.size, 8, args.classes)
    cpu = torch.device("cpu")
    settings = sorted({0, 1, 2, cores})
    load_before = os.getloadavg()
    crf_s = one_crf_seconds(args.size, args.classes, 3)

    seconds: dict[int, list[float]] = {w: [] for w in settings}
    cpu_seconds: dict[int, list[tuple[float, float]]] = {w: [] for w in settings}  # (this process, workers)
    results = {}
    for repeat in range(args.repeats):
        for workers in settings if repeat % 2 == 0 else reversed(settings):
            start, main_cpu, workers_cpu = time.perf_counter(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
            results[workers] = evaluate_model(model, backbone, batches, args.classes, cpu, crf=True,
                                              crf_workers=workers)
            seconds[workers].append(time.perf_counter() - start)
            # the workers were joined when the pool closed, so their CPU time is counted in RUSAGE_CHILDREN
            cpu_seconds[workers].append((_cpu(resource.RUSAGE_SELF) - main_cpu,
                                         _cpu(resource.RUSAGE_CHILDREN) - workers_cpu))
    load_after = os.getloadavg()

    serial = min(seconds[0])
    rows = []
    for workers in settings:
        best = min(seconds[workers])
        speedup = serial / best
        main_cpu, workers_cpu = min(cpu_seconds[workers], key=sum)
        rows.append({"crf_workers": workers, "seconds": round(best, 2), "all_seconds": [round(s, 2) for s in seconds[workers]],
                     "main_cpu_s_per_image": round(main_cpu / args.images, 3),
                     "workers_cpu_s_per_image": round(workers_cpu / args.images, 3),
                     "images_per_s": round(args.images / best, 3), "speedup": round(speedup, 2),
                     "speedup_per_worker": round(speedup / workers, 2) if workers else None,
                     "identical_to_serial": results[workers] == results[0]})
    report = {"machine": f"{platform.node()}, {os.cpu_count()} cores ({cores} available to this process), "
                         f"{platform.processor() or platform.machine()}",
              "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
              "images": args.images, "size": args.size, "classes": args.classes, "heads": 2,
              "one_crf_s": round(crf_s, 3), "rows": rows}
    print(f"{args.images} images of {args.size} px, {args.classes} classes, 2 heads; one CRF (one image, one head) "
          f"{crf_s:.3f} CPU s; {cores} core(s) available; load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print("crf_workers  seconds  images/s  speed-up  per worker  CPU s/image: main, workers  identical")
    for row in rows:
        per_worker = "-" if row["speedup_per_worker"] is None else f"{row['speedup_per_worker']:.2f}"
        print(f"{row['crf_workers']:11d}  {row['seconds']:7.2f}  {row['images_per_s']:8.3f}  {row['speedup']:8.2f}  "
              f"{per_worker:>10}  {row['main_cpu_s_per_image']:17.3f}, {row['workers_cpu_s_per_image']:7.3f}  "
              f"{row['identical_to_serial']}")
    print(f"median of the serial runs per image: {statistics.median(seconds[0]) / args.images:.2f} s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
