"""Shared builders for tests: a synthetic dataset, a tiny, fast training config, clustered loss
inputs, golden files, the README's code blocks, checkpoints in the authors' layout. Test modules
import from here, never from one another; fixtures are in conftest.py."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from hpseg.cli.main import main
from hpseg.config import Config
from hpseg.data import build_raw_dataset, make_synthetic_dataset, prepare_five_crops
from hpseg.method import SharedContrastPattern


def tiny_overrides(data_root: Path, runs: Path, steps: int = 12) -> list[str]:
    return [
        "backbone.name=vit_tiny_p8", "backbone.pretrained=false",
        "data.dataset=folder", f"data.root={data_root}", "data.crop_size=32", "data.val_size=32",
        "data.num_workers=0",
        "method.dim=16", "method.n_classes=4", "method.pool_size=32", "method.warmup=3", "method.renew_interval=5",
        "train.batch_size=4", f"train.max_steps={steps}", "train.val_interval=6", "train.log_interval=1",
        "train.checkpoint_interval=4", f"train.output_dir={runs}", "train.val_max_images=4",
    ]


def synthetic_prepared(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    """A synthetic folder dataset with its five-crop training set prepared; returns the data root."""
    data = root / "data"
    if not (data / "hpseg_prepared" / "train_32" / "manifest.json").exists():
        make_synthetic_dataset(data, n_train=n_train, n_val=n_val, size=64, n_classes=4, seed=0)
        raw = build_raw_dataset("folder", data, "train")
        prepare_five_crops(raw, data / "hpseg_prepared" / "train_32", crop_size=32)
    return data


def tiny_config(data_root: Path, runs: Path, steps: int = 12, extra: list[str] | None = None) -> Config:
    return Config().override(tiny_overrides(data_root, runs, steps) + list(extra or []))


def clustered_batch(hw: int, batch: int, width_f: int, dim: int, rho: float, seed: int = 3):
    """Features in 4 tight clusters and pools between two clusters each (similarity about 0.7 to
    both), so that no similarity lies near a threshold: half-precision products flip no positive.

    Returns f (N, width_f), s (N, dim), normalised z and z_mix (N, dim), the pools and a (hw, N) pattern.
    """
    g = torch.Generator().manual_seed(seed)
    n = hw * batch

    def clustered(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        prototypes = torch.linalg.qr(torch.randn(width, 4, generator=g))[0].T  # orthonormal rows
        labels = torch.randint(4, (n,), generator=g)
        # Noise of one norm at every width (0.05 per coordinate at width 24).
        features = prototypes[labels] + 0.05 * torch.randn(n, width, generator=g) / (width / 24) ** 0.5
        return features, prototypes[[0, 1, 2]] + prototypes[[1, 2, 3]]

    (f, pool_ag), (s, pool_sp) = clustered(width_f), clustered(dim)
    z = F.normalize(s + 0.5 * torch.randn(n, dim, generator=g), dim=1)
    z_mix = F.normalize(z + 0.3 * torch.randn(n, dim, generator=g), dim=1)
    return f, s, z, z_mix, pool_ag, pool_sp, torch.rand(hw, n, generator=g) < rho


class Notices(logging.Handler):
    """The messages of the ``hpseg`` logger's records (INFO and above); see the ``notices`` fixture."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------------------- files and processes


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a torn line fails the test (unlike hpseg.files.read_jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a distributed job's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ README

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: Every Markdown file whose commands a user may copy: README and the documentation site's pages.
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.M | re.S)]


# ----------------------------------------------------------------------------------- golden files

DATA = Path(__file__).parent / "data"
EXTRA_GOLDEN = "HPSEG_EXTRA_GOLDEN"


def golden_files(pattern: str) -> list[Path]:
    """The files matching ``pattern`` in tests/data, then those in $HPSEG_EXTRA_GOLDEN (if set)."""
    files = sorted(DATA.glob(pattern))
    extra = os.environ.get(EXTRA_GOLDEN)
    if extra:
        if not Path(extra).is_dir():
            raise FileNotFoundError(f"{EXTRA_GOLDEN}={extra} is not a folder")
        files += [p for p in sorted(Path(extra).glob(pattern)) if p.resolve().parent != DATA.resolve()]
    return files


def golden_id(path: Path) -> str:
    """The test id of a golden file: its stem, prefixed with ``extra-`` outside tests/data."""
    return path.stem if path.parent == DATA else f"extra-{path.stem}"


GOLDEN = golden_files("hp_*.npz")
BACKBONE_GOLDEN = golden_files("backbone_*.npz")


def load_golden(path: Path) -> dict:
    """A golden file's arrays as tensors."""
    with np.load(path) as archive:
        return {key: torch.tensor(archive[key]) for key in archive.files}


def full_contrast(hw: int, n: int) -> SharedContrastPattern:
    """The contrast pattern in which every one of ``hw`` anchors is contrasted with all ``n`` patches."""
    return SharedContrastPattern(torch.ones(hw, n, dtype=torch.bool))


# ------------------------------------------------------------------ the authors' checkpoint layout

#: The authors' checkpoints in tests: a tiny ViT (vit_tiny_p8: width 64, patch 8, 2 blocks), head
#: dimension D = 16, 5 classes.
AUTHORS_WIDTH, AUTHORS_DIM, AUTHORS_CLASSES, AUTHORS_PATCH = 64, 16, 5, 8


def authors_vit():
    """The tiny timm ViT of :func:`authors_payload` (random weights)."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                             patch_size=8, embed_dim=64, depth=2, num_heads=4, img_size=32)


def authors_payload(seed: int = 0) -> dict:
    """A checkpoint in the reference's layout: a tiny ViT under model.*, random heads and probes."""
    torch.manual_seed(seed)
    vit = authors_vit()
    net = {f"model.{k}": v.clone() for k, v in vit.state_dict().items()}

    width, dim, classes = AUTHORS_WIDTH, AUTHORS_DIM, AUTHORS_CLASSES

    def head(prefix: str) -> dict:
        return {
            f"{prefix}1.0.weight": torch.randn(dim, width, 1, 1) * 0.1, f"{prefix}1.0.bias": torch.randn(dim) * 0.1,
            f"{prefix}2.0.weight": torch.randn(width, width, 1, 1) * 0.1, f"{prefix}2.0.bias": torch.randn(width) * 0.1,
            f"{prefix}2.2.weight": torch.randn(dim, width, 1, 1) * 0.1, f"{prefix}2.2.bias": torch.randn(dim) * 0.1,
        }

    net.update(head("cluster"))
    net.update(head("ema_model"))
    return {
        "net_model_state_dict": net,
        "linear_model_state_dict": {"weight": torch.randn(classes, dim, 1, 1), "bias": torch.randn(classes)},
        "cluster_model_state_dict": {"clusters": torch.randn(classes, dim)},
        "epoch": 2,
    }


def dino_reference_positions(pos_embed: torch.Tensor, images: torch.Tensor, patch: int) -> torch.Tensor:
    """DINO's interpolate_pos_encoding, written as DINO writes it (its ``w`` is the image's
    height): an independent check of hpseg's version."""
    _, _, w, h = images.shape
    n = pos_embed.shape[1] - 1
    if (w // patch) * (h // patch) == n and w == h:
        return pos_embed
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos_embed.shape[-1])], 1)


# ----------------------------------------------------------------- the CLI, as a user runs it


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``hpseg ARGV`` in-process -> (exit status, stderr); asserts no traceback was printed."""
    status = main([*argv, "-q"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return status, captured.err + captured.out


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one-line error of a command that must stop with exit status 2."""
    status, text = run(capsys, *argv)
    assert status == 2, text
    errors = [line for line in text.splitlines() if ": error: " in line]
    assert len(errors) == 1, text
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ results of `hpseg eval`


def fake_results(seed: int, miou: float, *, crf: bool = False, config: Config | None = None, kind: str = "last",
                 run=None) -> dict:
    config = copy.deepcopy(config or Config())
    config.train.seed = seed
    return {
        "checkpoint": str(run / "checkpoints" / f"{kind}.pt") if run else f"/nowhere/{kind}.pt",
        "checkpoint_kind": kind, "selection": "last step", "selection_rule": kind, "step": 100, "seed": seed,
        "crf": crf, "dataset": "folder", "backbone": "vit_tiny_p8", "n_images": 8,
        "hp": {"unsupervised_accuracy": 0.8, "unsupervised_miou": miou, "linear_accuracy": 0.9, "linear_miou": 0.7},
        "matching": {"hp": "hungarian"}, "config": config.to_dict(),
    }


def write_results(path, results):
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(results))
    return path


# ------------------------------------------------------------ a COCO-Stuff tree on disk

H, W = 40, 48


def random_rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save_png(a: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


def stripes(values: list[int], h: int = H, w: int = W) -> np.ndarray:
    """(h, w) uint8 label with one vertical band per value."""
    lab = np.zeros((h, w), np.uint8)
    for j, v in enumerate(np.array_split(np.arange(w), len(values))):
        lab[:, v] = values[j]
    return lab


COCO_IDS = ["000000000009", "000000000025"]
FINE = [0, 9, 91, 100, 181, 255]  # hand-picked fine ids, 255 = unlabeled


def make_coco(root: Path) -> Path:
    json_path = Path(__file__).parents[1] / "src/hpseg/data/cocostuff27.json"
    assert json_path.is_file()
    for _split, sd, lst in [
        ("train", "train2017", "Coco164kFull_Stuff_Coarse.txt"),
        ("val", "val2017", "Coco164kFull_Stuff_Coarse_7.txt"),
    ]:
        for k, i in enumerate(COCO_IDS):
            img_path = root / "images" / sd / f"{i}.jpg"
            img_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(random_rgb(k)).save(img_path, quality=90)
            save_png(stripes(FINE), root / "annotations" / sd / f"{i}.png")
        (root / "curated" / sd).mkdir(parents=True, exist_ok=True)
        (root / "curated" / sd / lst).write_text("\n".join(COCO_IDS) + "\n")
    return root
