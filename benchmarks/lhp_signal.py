"""What the backbone fix of issue 10 changes: LHP neighbour weights from the pre-softmax attention
scores (now) vs from the probabilities (before), and DINO's position interpolation (now) vs timm's
antialiased resize (before). Not a test; seconds on a CPU.

    python benchmarks/lhp_signal.py --golden tests/data/backbone_a.npz --synthetic /tmp/hpseg-lhp

Per-row statistics are over each patch's in-grid 3x3 neighbours: max weight, spread (max - min)
and the share of neighbours zeroed by the below-mean cut.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from hpseg.backbones import create_backbone, get_spec
from hpseg.method import attention_neighbour_weights
from hpseg.method.local_positives import neighbour_indices


def _relative_error(backbone, images: torch.Tensor, reference: torch.Tensor) -> float:
    """||features - reference|| / ||reference|| of ``backbone`` on ``images``."""
    return round(((backbone(images).features - reference).norm() / reference.norm()).item(), 6)


def row_stats(weights: torch.Tensor, grid: tuple[int, int]) -> dict[str, float]:
    """(B, hw, 9) neighbour weights -> mean over rows of max, spread, zeroed share."""
    valid = neighbour_indices(*grid)[1].expand_as(weights)
    big, small = weights.masked_fill(~valid, -1e9), weights.masked_fill(~valid, 1e9)
    zero = ((weights == 0) & valid).sum(-1) / valid.sum(-1)
    return {"row_max": round(big.max(-1).values.mean().item(), 4),
            "row_spread": round((big.max(-1).values - small.min(-1).values).mean().item(), 4),
            "zeroed": round(zero.float().mean().item(), 4)}


def compare(backbone, images: torch.Tensor, sigma: float = 28.0) -> dict[str, dict[str, float]]:
    out = backbone(images, with_attention=True)
    grid = tuple(out.features.shape[-2:])
    n = backbone.num_prefix_tokens
    return {"scores (now)": row_stats(attention_neighbour_weights(out.attention_scores, grid, n, sigma), grid),
            "probabilities (before)": row_stats(
                attention_neighbour_weights(out.attention_probabilities(), grid, n, sigma), grid)}


def golden(path: Path, work: Path) -> dict:
    g = np.load(path)
    teacher = {k[len("teacher/"):]: torch.tensor(g[k]) for k in g.files if k.startswith("teacher/")}
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"teacher": teacher}, work / "golden.pth")
    now = create_backbone("vit_tiny_p8", weights=work / "golden.pth")
    spec = dataclasses.replace(get_spec("vit_tiny_p8"), position_interpolation="timm")
    before = create_backbone(spec, weights=work / "golden.pth")
    report = {}
    for size in (32, 64, 96):
        images, reference = torch.tensor(g[f"image_{size}"]), torch.tensor(g[f"features_{size}"])

        report[f"{size}px"] = {"features_rel_error_now": _relative_error(now, images, reference),
                               "features_rel_error_before": _relative_error(before, images, reference),
                               **compare(now, images)}
    return report


def synthetic(work: Path) -> dict:
    from hpseg.data import TrainCrops
    from tests.helpers import synthetic_prepared

    data = synthetic_prepared(work, n_train=16)
    crops = TrainCrops(data / "hpseg_prepared" / "train_32", with_augmented=False)
    images = torch.stack([crops[i]["image"] for i in range(len(crops))])
    return {"tiny random ViT, 32 px crops": compare(create_backbone("vit_tiny_p8", pretrained=False), images)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden", type=Path, default=Path("tests/data/backbone_a.npz"))
    parser.add_argument("--synthetic", type=Path, default=Path("hpseg-lhp-signal"))
    args = parser.parse_args()
    print(json.dumps({"golden backbone_a": golden(args.golden, args.synthetic), **synthetic(args.synthetic)}, indent=1))
