"""The method reproduces the authors' reference implementation (tests/data/hp_*.npz, see README there).

Further golden files of the same names in the folder named by ``HPSEG_EXTRA_GOLDEN`` (when set) are
checked too, each as its own test case, so that new reference values need no change of code.
"""

import os
import shutil
import subprocess
import sys
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


def load(path: Path) -> dict:
    with np.load(path) as archive:
        return {key: torch.tensor(archive[key]) for key in archive.files}


def test_golden_files_present():
    assert [p.name for p in sorted(DATA.glob("hp_*.npz"))] == ["hp_a.npz", "hp_b.npz", "hp_c.npz"]


@pytest.mark.parametrize("path", GOLDEN, ids=golden_id)
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


@pytest.mark.parametrize("path", GOLDEN, ids=golden_id)
def test_local_propagation_matches_reference(path):
    g = load(path)
    side = int(g["side"])
    weights = attention_neighbour_weights(g["lhp_attention"], (side, side), num_prefix_tokens=1, sigma=float(g["lhp_sigma"]))
    mixed = propagate_to_neighbours(g["lhp_code"], weights)
    torch.testing.assert_close(mixed, g["lhp_code_mix"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(bool(os.environ.get(EXTRA_GOLDEN)), reason="checks the variable itself: run without it")
def test_extra_golden_folder_adds_test_cases(tmp_path):
    """A copy of hp_a.npz and a file of another name in $HPSEG_EXTRA_GOLDEN: the copy becomes
    three more test cases, which pass; the other file is ignored."""
    shutil.copy(DATA / "hp_a.npz", tmp_path / "hp_a.npz")
    (tmp_path / "notes_a.npz").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")} | {EXTRA_GOLDEN: str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", "-k", "extra-", "-rA",
         __file__],
        env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    passed = sorted(line.split("::", 1)[1] for line in result.stdout.splitlines() if line.startswith("PASSED"))
    assert passed == [
        "test_local_propagation_matches_reference[extra-hp_a]",
        "test_loss_and_gradients_match_reference[5-extra-hp_a]",
        "test_loss_and_gradients_match_reference[None-extra-hp_a]",
    ], result.stdout[-3000:]
