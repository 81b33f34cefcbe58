"""The size of each data [ref quirk]: the authors' default against its cleaner option.

Part 1 — inputs, on the golden fixture (tests/data/data_a.npz, the authors' pipeline on tiny
COCO-Stuff-27 / Cityscapes-27 / Potsdam-3 trees): the real ``hpseg prepare`` with each setting,
``TrainCrops`` as training reads it, compared with the authors' training tensors; the photometric
order compared on the golden contract's cases.

Part 2 — short training runs (CPU, the tiny random ViT ``vit_tiny_p8``) on a texture mosaic
(hpseg.data.mosaic): COCO-like runs (folder layout, five crops) with each default against its
option, and Potsdam-like runs (the mosaic written in Potsdam's ``.mat`` layout, half of the
training tiles unlabelled) with the whole-tile labelled set against both lists five-cropped.
One seed each: these show what changes (items, steps, inputs, metrics), not significance.

    python benchmarks/data_effects.py --work /tmp/hpseg-data-effects [--steps 20 --epochs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.io import savemat

from hpseg.cli.main import main
from hpseg.data import IMAGENET_MEAN, IMAGENET_STD, PhotometricParams, TrainCrops, normalize, photometric_view
from hpseg.data.datasets import safe_key
from hpseg.data.mosaic import make_texture_mosaic_dataset

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "data" / "data_a.npz"
LEVEL = 1 / 255 / 0.226  # one grey level in normalised units (the mean ImageNet std)


# ------------------------------------------------------------------------------------ part 1


def _write_fixture(g: dict, root: Path) -> None:
    offsets = g["fixture_offsets"]
    for i, rel in enumerate(g["fixture_paths"]):
        (root / str(rel)).parent.mkdir(parents=True, exist_ok=True)
        (root / str(rel)).write_bytes(g["fixture_bytes"][offsets[i]:offsets[i + 1]].tobytes())


def _cli(args: list[str]) -> None:
    """``hpseg ARGS`` in this process, its printed lines kept out of the tables."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0, args


def _prepare(g: dict, d: str, root: Path, out: Path, options: list[str]) -> TrainCrops:
    res = int(g["config/train_res"])
    _cli(["prepare", "--preset", str(g[f"config/{d}/hpseg_name"]), "--data-root",
                 str(root / str(g[f"config/{d}/root"])), "--out", str(out), f"data.crop_size={res}", *options])
    return TrainCrops(out, with_augmented=False)


def _stems(g: dict, d: str) -> list[str]:
    return [safe_key(str(n)) if c < 0 else f"{safe_key(str(n))}_{int(c)}"
            for n, c in zip(g[f"{d}/train/name"], g[f"{d}/train/crop"])]


def golden_figures(work: Path) -> list[str]:
    with np.load(GOLDEN) as archive:
        g = {key: archive[key] for key in archive.files}
    _write_fixture(g, work / "raw")
    rows = []
    for d in ("cocostuff27", "cityscapes", "potsdam"):
        reference = dict(zip(_stems(g, d), g[f"{d}/train/image"]))
        for label, options in [("default", []), ("data.crop_format=png", ["data.crop_format=png"]),
                               ("data.potsdam_train=all_five_crops", ["data.potsdam_train=all_five_crops"])]:
            if d != "potsdam" and "potsdam" in label:
                continue
            crops = _prepare(g, d, work / "raw", work / f"{d}-{len(rows)}", options)
            common = [i for i, stem in enumerate(crops.crops) if stem in reference]
            diffs = [np.abs(crops[i]["image"].numpy() - reference[crops.crops[i]]) for i in common]
            worst = max((float(x.max()) for x in diffs), default=float("nan")) / LEVEL
            mean = float(np.mean([x.mean() for x in diffs])) / LEVEL if diffs else float("nan")
            rows.append(f"| {d} | {label} | {len(crops)} | {len(reference)} | {len(common)} | "
                        f"{worst:.1f} | {mean:.2f} |")
    cases = []
    for k in range(len(g["photometric/index"])):
        def factor(name: str, k: int = k) -> float | None:
            value = float(g[f"photometric/{name}"][k])
            return None if np.isnan(value) else value

        params = PhotometricParams(tuple(int(i) for i in g["photometric/order"][k]), factor("brightness"),
                                   factor("contrast"), factor("saturation"), factor("hue"),
                                   bool(g["photometric/grayscale"][k]), factor("blur_sigma"))
        image = torch.from_numpy(g["photometric/input"][k])
        rgb = _unnormalize(image)
        default = photometric_view(image, params)
        option = normalize(photometric_view(rgb, params))
        output = torch.from_numpy(g["photometric/output"][k])
        cases.append((float((default - output).abs().max()), float((option - output).abs().max())))
    worst_default = max(c[0] for c in cases)
    option_diffs = sorted(c[1] for c in cases)
    rows.append(f"\nphotometric contract ({len(cases)} cases): default (normalised tensor) max |Δ| "
                f"{worst_default:.1e}; data.photometric_input=uint8 max |Δ| per case {option_diffs[0]:.2f} .. "
                f"{option_diffs[-1]:.2f} (normalised units), above 0.5 in "
                f"{sum(d > 0.5 for d in option_diffs)} of {len(cases)}")
    return rows


def _unnormalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised float -> uint8 (the golden inputs are normalised uint8 images)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------ part 2

TINY = ["data.crop_size=32", "data.val_size=32", "data.num_workers=0", "method.dim=32", "method.pool_size=128",
        "method.renew_interval=20", "train.batch_size=8", "train.log_interval=1000", "train.checkpoint_interval=1000"]


def _train(work: Path, name: str, preset: str, data: Path, options: list[str], run_length: list[str]) -> dict:
    common = ["--preset", preset, "--data-root", str(data), "--no-progress", *TINY, *options]
    prepared = work / f"prepared-{name}"
    _cli(["prepare", *common, "--out", str(prepared)])
    started = time.time()
    run = work / f"run-{name}"
    _cli(["train", *common, f"data.prepared_dir={prepared}", "--backbone", "vit_tiny_p8", "--random-backbone",
          "--run-dir", str(run), *run_length])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = max(int(r.get("step", 0)) for r in records)
    validation = [r["validation"] for r in records if "validation" in r]
    metrics = validation[-1] if validation else {}  # the last step's (train.selection=last's weights)
    return {"items": len(TrainCrops(prepared, with_augmented=False)), "steps": steps, "metrics": metrics,
            "seconds": round(time.time() - started, 1)}


def potsdam_mosaic(source: Path, out: Path) -> Path:
    """The mosaic's tiles in Potsdam's layout: even training tiles labelled, odd ones unlabelled."""
    (out / "imgs").mkdir(parents=True)
    (out / "gt").mkdir()
    lists: dict[str, list[str]] = {"labelled_train.txt": [], "unlabelled_train.txt": [], "labelled_test.txt": []}
    for split in ("train", "val"):
        for i, path in enumerate(sorted((source / split / "images").glob("*.png"))):
            tile = f"{split}{i}"
            rgb = np.asarray(Image.open(path).convert("RGB"))
            savemat(out / "imgs" / f"{tile}.mat", {"img": np.dstack([rgb, rgb[:, :, :1]])})
            labelled = split == "val" or i % 2 == 0
            if labelled:
                label = np.asarray(Image.open(source / split / "labels" / path.name)).astype(np.int32)
                savemat(out / "gt" / f"{tile}.mat", {"gt": label})
            name = "labelled_test.txt" if split == "val" else ("labelled_train.txt" if labelled else "unlabelled_train.txt")
            lists[name].append(tile)
    for name, tiles in lists.items():
        (out / name).write_text("\n".join(tiles) + "\n")
    (out / "all.txt").write_text("\n".join(sum(lists.values(), [])) + "\n")
    return out


def training_runs(work: Path, steps: int, epochs: int) -> list[str]:
    coco_like = make_texture_mosaic_dataset(work / "mosaic", n_train=24, n_val=8, size=64, n_classes=4, seed=0)
    coco_options = [("default (jpeg, normalized)", []), ("data.crop_format=png", ["data.crop_format=png"]),
                    ("data.photometric_input=uint8", ["data.photometric_input=uint8"])]
    rows = []
    for k, (label, options) in enumerate(coco_options):
        result = _train(work, f"coco{k}", "cocostuff27", coco_like, ["data.dataset=folder", "method.n_classes=4",
                        *options], [f"train.max_steps={steps}", f"method.warmup={steps // 6}", "train.val_interval=1000"])
        rows.append(_row("cocostuff27 preset, mosaic", label, result))
    three = make_texture_mosaic_dataset(work / "mosaic3", n_train=24, n_val=8, size=64, n_classes=3, seed=1)
    potsdam = potsdam_mosaic(three, work / "potsdam")
    for k, (label, options) in enumerate([("default (labelled, whole)", []),
                                          ("data.potsdam_train=all_five_crops", ["data.potsdam_train=all_five_crops"])]):
        result = _train(work, f"potsdam{k}", "potsdam3", potsdam, options,
                        [f"train.epochs={epochs}", "method.warmup=5", "train.val_interval=1000"])
        rows.append(_row("potsdam3 preset, mosaic", label, result))
    return rows


def _row(what: str, label: str, result: dict) -> str:
    m = result["metrics"]
    pick = [m.get(k) for k in ("unsupervised_miou", "unsupervised_accuracy", "linear_miou", "linear_accuracy")]
    shown = " | ".join("-" if v is None else f"{100 * v:.1f}" for v in pick)
    return f"| {what} | {label} | {result['items']} | {result['steps']} | {shown} | {result['seconds']} |"


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hpseg-data-effects"))
    parser.add_argument("--steps", type=int, default=20, help="steps of each COCO-like run")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each Potsdam-like run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    torch.set_num_threads(2)
    print("| dataset | setting | items | authors' items | in common | max |Δ| (levels) | mean |Δ| (levels) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(golden_figures(args.work / "golden")), flush=True)
    print("\n| data | setting | items | steps | unsup. mIoU | unsup. acc | linear mIoU | linear acc | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(training_runs(args.work, args.steps, args.epochs)))


if __name__ == "__main__":
    main_()
