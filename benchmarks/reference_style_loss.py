"""A reference-style GHP + LHP loss: the local baseline of ``loss_benchmark.py``.

Written for this project from spec §3-§5 (not copied from the authors' code); it mirrors the
*approach* of the authors' implementation, whose memory behaviour is what the benchmark
compares against:

- one image at a time, each image's hw anchors against all N patches of the batch;
- full (hw x N) similarity matrices of f, s', z and z_mix for every image;
- positive and contrast masks as float16 (hw x N) matrices;
- one shared (hw x N) random pattern for the contrast subsample ([ref quirk]);
- plain autograd: every image's (hw x N) logits, exponentials and masks stay alive until
  ``backward``, so memory grows as B x hw x N = N^2 (about 80 GB at N = 50,176).

Run this file to check it against the golden files (``tests/data/hp_*.npz``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def reference_style_loss(
    z: torch.Tensor,
    z_mix: torch.Tensor,
    task_agnostic: torch.Tensor,
    task_specific: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    random_pattern: torch.Tensor,
    *,
    patches_per_image: int,
    lmbd: float,
    tau: float,
    tau_base: float = 0.07,
    reweighting: bool = True,
) -> torch.Tensor:
    """(sum_b L_GHP(b) + sum_b L_LHP(b)) / (2B) of spec §5, reference style.

    Args:
        z, z_mix: (N, D) normalised embeddings (GHP and LHP side); gradients flow into them.
        task_agnostic, task_specific: (N, C) f and (N, D) s' (normalised here).
        pool_agnostic, pool_specific: (P, C) and (P, D) threshold pools.
        random_pattern: (hw, N) bool, True where patch j is in anchor row i's random subsample;
            shared by the anchors of every image.
    """
    hw = patches_per_image
    n = z.shape[0]
    batch = n // hw
    half = torch.float16
    fn = F.normalize(task_agnostic, dim=1)
    sn = F.normalize(task_specific, dim=1)
    r_ag = (fn @ F.normalize(pool_agnostic, dim=1).T).max(1).values
    r_sp = (sn @ F.normalize(pool_specific, dim=1).T).max(1).values
    random_mask = random_pattern.to(half)
    # not_self of image 0: ones except (i, i); rolled by hw columns for every next image.
    not_self = torch.ones(hw, n, dtype=half, device=z.device)
    diagonal = torch.arange(hw, device=z.device)
    not_self[diagonal, diagonal] = 0
    scale = tau / tau_base
    loss = z.new_zeros(())
    for b in range(batch):
        rows = slice(b * hw, (b + 1) * hw)
        sim_f = fn[rows] @ fn.T  # (hw, N)
        positive = ((sim_f > r_ag[rows, None]) | (sim_f > r_ag[None, :])).to(half)
        contrast = torch.logical_or(positive, random_mask).to(half) * not_self
        positive = positive * not_self
        sim_s = sn[rows] @ sn.T  # (hw, N)
        specific = ((sim_s > r_sp[rows, None]) | (sim_s > r_sp[None, :])).to(half) * not_self

        kept = positive.sum(1) != 0
        weights = (positive[kept] + specific[kept] * lmbd).detach()  # float16, like the masks
        weight_sums = weights.sum(1, dtype=torch.float32)
        omega = weight_sums / weight_sums.mean() if reweighting else 1.0
        for emb in (z, z_mix):
            logits = emb[rows] @ emb.T / tau  # (hw, N), kept by autograd
            logits = logits - logits.max(1, keepdim=True).values.detach()
            exp_logits = logits.exp() * contrast
            log_prob = logits - exp_logits.sum(1, keepdim=True).log()
            mean_log_prob = (weights * log_prob[kept]).sum(1) / weight_sums
            if kept.any():
                loss = loss - (scale * mean_log_prob * omega).mean()
        not_self = torch.roll(not_self, hw, dims=1)
    return loss / batch / 2


def golden_cases(data_dir: Path | None = None) -> list[tuple[str, dict]]:
    """(file name, tensors) of every golden file ``hp_*.npz`` (tests/data by default)."""
    import numpy as np

    data_dir = data_dir or Path(__file__).resolve().parents[1] / "tests" / "data"
    paths = sorted(data_dir.glob("hp_*.npz"))
    if not paths:
        raise FileNotFoundError(f"no golden files hp_*.npz in {data_dir}")
    cases = []
    for path in paths:
        with np.load(path) as archive:
            cases.append((path.name, {key: torch.tensor(archive[key]) for key in archive.files}))
    return cases


def assert_matches_golden(name: str, g: dict, loss: torch.Tensor, grad_z: torch.Tensor, grad_z_mix: torch.Tensor) -> None:
    """The README's tolerances: 1e-3 relative on the loss, 1e-3 x max|grad| on the gradients."""
    expected = g["loss"].item()
    assert abs(loss.item() - expected) <= 1e-3 * abs(expected), (name, loss.item(), expected)
    for grad, key in ((grad_z, "grad_z"), (grad_z_mix, "grad_z_mix")):
        error = (grad - g[key]).abs().max().item()
        assert error <= 1e-3 * g[key].abs().max().item(), (name, key, error)


def golden_loss(g: dict, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The baseline's loss and gradients of z and z_mix on one golden case, computed on ``device``."""
    g = {key: value.to(device) for key, value in g.items()}
    z = g["z"].clone().requires_grad_()
    z_mix = g["z_mix"].clone().requires_grad_()
    loss = reference_style_loss(
        z, z_mix, g["f"], g["s_ema"], g["pool_ag"], g["pool_sp"], g["uniform"] < float(g["rho"]),
        patches_per_image=int(g["side"]) ** 2, lmbd=float(g["lmbd"]), tau=float(g["tau"]),
        tau_base=float(g["base_tau"]), reweighting=bool(g["reweighting"]),
    )
    loss.backward()
    return loss.detach(), z.grad, z_mix.grad


def check_against_golden(data_dir: Path | None = None) -> int:
    """Assert value and gradients against every golden file (README tolerances); returns the count."""
    cases = golden_cases(data_dir)
    for name, g in cases:
        assert_matches_golden(name, g, *golden_loss(g))
    return len(cases)


if __name__ == "__main__":
    print(f"reference-style loss matches {check_against_golden()} golden files")
