"""The method reproduces the authors' reference implementation (tests/data/hp_*.npz, see README there)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hpseg.method import (
    SharedContrastPattern,
    attention_neighbour_weights,
    hidden_positive_loss,
    propagate_to_neighbours,
)

GOLDEN = sorted((Path(__file__).parent / "data").glob("hp_*.npz"))


def load(path: Path) -> dict:
    with np.load(path) as archive:
        return {key: torch.tensor(archive[key]) for key in archive.files}


def test_golden_files_present():
    assert [p.name for p in GOLDEN] == ["hp_a.npz", "hp_b.npz", "hp_c.npz"]


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_loss_and_gradients_match_reference(path, chunk_size):
    g = load(path)
    z = g["z"].clone().requires_grad_()
    z_mix = g["z_mix"].clone().requires_grad_()
    loss = hidden_positive_loss(
        z,
        z_mix,
        g["f"],
        g["s_ema"],
        g["pool_ag"],
        g["pool_sp"],
        patches_per_image=int(g["side"]) ** 2,
        contrast_draw=SharedContrastPattern.from_uniform(g["uniform"], float(g["rho"])),
        lmbd=float(g["lmbd"]),
        tau=float(g["tau"]),
        tau_base=float(g["base_tau"]),
        reweighting=bool(g["reweighting"]),
        chunk_size=chunk_size,
    )
    loss.backward()
    # Tolerances of the README: the reference keeps masks and their sums in float16.
    assert loss.item() == pytest.approx(g["loss"].item(), rel=1e-3)
    for grad, key in ((z.grad, "grad_z"), (z_mix.grad, "grad_z_mix")):
        scale = g[key].abs().max().item()
        assert (grad - g[key]).abs().max().item() <= 1e-3 * scale, key


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_local_propagation_matches_reference(path):
    g = load(path)
    side = int(g["side"])
    weights = attention_neighbour_weights(g["lhp_attention"], (side, side), num_prefix_tokens=1, sigma=float(g["lhp_sigma"]))
    mixed = propagate_to_neighbours(g["lhp_code"], weights)
    torch.testing.assert_close(mixed, g["lhp_code_mix"], rtol=1e-5, atol=1e-6)
