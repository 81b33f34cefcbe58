"""Training items, steps per epoch and total steps of every preset at the release's dataset sizes.

hpseg's own code path counts them: the real raw datasets (``build_raw_dataset``) opened on a tree
of empty files laid out like the release (49,629 COCO-Stuff training images in the curated list,
2,975 Cityscapes training images, 4,545 labelled + 3,150 unlabelled Potsdam tiles: no image is
read when a dataset is opened), the preparation's item rule (``item_stems``) and the real
``Trainer`` built on a feature source of that many items (its ``steps_per_epoch`` and
``total_steps``). Beside them, the authors' arithmetic: their loader drops the last incomplete
batch (``drop_last=True``), so steps per epoch = items // batch and total = epochs × that.

    python benchmarks/data_steps.py            # prints the Markdown table of BENCHMARKS.md
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from hpseg.backbones import create_backbone
from hpseg.config import load_preset, preset_names
from hpseg.data import build_raw_dataset
from hpseg.data.prepare import item_stems
from hpseg.training.trainer import Trainer

#: Training images of the releases (spec §7; Potsdam: the split sizes its preparation script implies).
COCO_TRAIN, CITYSCAPES_TRAIN, POTSDAM_LABELLED, POTSDAM_UNLABELLED = 49_629, 2_975, 4_545, 3_150
#: What the authors train on, per dataset: (images, items per image).
AUTHORS = {"cocostuff27": (COCO_TRAIN, 5), "cityscapes27": (CITYSCAPES_TRAIN, 5), "potsdam3": (POTSDAM_LABELLED, 1)}


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def release_tree(root: Path) -> dict[str, Path]:
    """Empty files in each release's layout, at its training-set size."""
    coco = root / "cocostuff"
    ids = [f"{i:012d}" for i in range(COCO_TRAIN)]
    for i in ids:
        _touch(coco / "images/train2017" / f"{i}.jpg")
        _touch(coco / "annotations/train2017" / f"{i}.png")
    (coco / "curated/train2017").mkdir(parents=True)
    (coco / "curated/train2017/Coco164kFull_Stuff_Coarse.txt").write_text("\n".join(ids) + "\n")
    cityscapes = root / "cityscapes"
    for i in range(CITYSCAPES_TRAIN):
        city, base = f"city{i % 18:02d}", f"city{i % 18:02d}_{i:06d}_000019"
        _touch(cityscapes / "leftImg8bit/train" / city / f"{base}_leftImg8bit.png")
        _touch(cityscapes / "gtFine/train" / city / f"{base}_gtFine_labelIds.png")
    potsdam = root / "potsdam"
    labelled = [str(i) for i in range(POTSDAM_LABELLED)]
    unlabelled = [str(POTSDAM_LABELLED + i) for i in range(POTSDAM_UNLABELLED)]
    for i in labelled + unlabelled:
        _touch(potsdam / "imgs" / f"{i}.mat")
    for i in labelled:
        _touch(potsdam / "gt" / f"{i}.mat")
    (potsdam / "labelled_train.txt").write_text("\n".join(labelled) + "\n")
    (potsdam / "unlabelled_train.txt").write_text("\n".join(unlabelled) + "\n")
    return {"cocostuff27": coco, "cityscapes27": cityscapes, "potsdam3": potsdam}


class _Items:
    """A feature source of ``n`` items: all the Trainer reads of it before training is its length."""

    def __init__(self, n: int, n_classes: int) -> None:
        self.n, self.class_names = n, [f"class {k}" for k in range(n_classes)]

    def __len__(self) -> int:
        return self.n


def hpseg_counts(preset: str, root: Path, overrides: list[str], run_dir: Path) -> tuple[int, int, int]:
    """(training items, steps per epoch, total steps) by hpseg's code path."""
    config = load_preset(preset).override([f"data.root={root}", "train.device=cpu", *overrides])
    data = config.data
    raw = build_raw_dataset(data.dataset, root, "train", potsdam_lists=data.potsdam_lists())
    items = len(raw) * len(item_stems("key", data.crop_rule()))
    trainer = Trainer(config, run_dir, backbone=create_backbone("vit_tiny_p8", pretrained=False),
                      feature_source=_Items(items, config.method.n_classes))
    return items, trainer.steps_per_epoch, trainer.total_steps


def authors_counts(preset: str) -> tuple[int, int, int]:
    config = load_preset(preset)
    images, per_image = AUTHORS[config.data.dataset]
    items = images * per_image
    per_epoch = items // config.train.batch_size
    return items, per_epoch, per_epoch * config.train.epochs


VARIANTS = {"cocostuff27": [("default", [])], "cityscapes27": [("default", [])],
            "potsdam3": [("default", []), ("data.potsdam_train=all_five_crops", ["data.potsdam_train=all_five_crops"])]}


def main() -> None:
    logging.disable(logging.INFO)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        roots = release_tree(Path(tmp) / "releases")
        for preset in preset_names():
            config = load_preset(preset)
            authors = authors_counts(preset)
            for label, overrides in VARIANTS[config.data.dataset]:
                counts = hpseg_counts(preset, roots[config.data.dataset], overrides, Path(tmp) / "run")
                warmup = config.method.warmup / counts[2]
                rows.append(f"| {preset} | {label} | {counts[0]:,} | {counts[1]:,} | {counts[2]:,} | {warmup:.1%} | "
                            f"{authors[0]:,} | {authors[1]:,} | {authors[2]:,} | {counts[2] / authors[2]:.2f} |")
    print("| preset | data options | items (hpseg) | steps/epoch | total steps | warm-up share | items (authors) | "
          "steps/epoch | total steps | hpseg / authors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
