"""hpseg's training step reproduces five iterations of the reference's training loop
(tests/data/steps_*.npz and those in $HPSEG_EXTRA_GOLDEN; see the README beside the data).

The test drives :func:`hpseg.training.step.training_step` — the step ``hpseg train`` runs —
with the recorded backbone features and attention scores, contrast draws, λ and pools, from
the reference's initial weights; it compares every step's losses and clip norm, the final
weights and a renewal of the task-specific pool.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hpseg.config import Config
from hpseg.method import SharedContrastPattern, attention_neighbour_weights, fill_pool, picked_patches
from hpseg.runtime import resolve_device
from hpseg.training.features import StepInputs
from hpseg.training.pools import ThresholdPools
from hpseg.training.step import build_learner, specific_pool_maps, training_step

DATA = Path(__file__).parent / "data"


def golden_files() -> list[Path]:
    files = sorted(DATA.glob("steps_*.npz"))
    extra = os.environ.get("HPSEG_EXTRA_GOLDEN")
    if extra:
        files += sorted(Path(extra).glob("steps_*.npz"))
    return files


# The reference's parameter names -> hpseg's (HiddenPositivesModel.state_dict()).
REFERENCE_NAMES = {
    "cluster1.0": "segmentation.linear",
    "cluster2.0": "segmentation.nonlinear.0",
    "cluster2.2": "segmentation.nonlinear.2",
    "ema_model1.0": "ema_segmentation.linear",
    "ema_model2.0": "ema_segmentation.nonlinear.0",
    "ema_model2.2": "ema_segmentation.nonlinear.2",
    "project_head": "projection.linear",
    "linear_model": "linear_probe.classifier",
}
LOSSES = {"loss_supcon": "hp", "loss_consistency": "consistency", "loss_linear": "linear_probe",
          "loss_cluster": "cluster_probe", "loss_total": "loss"}


def hpseg_name(reference: str) -> str:
    if reference == "cluster_model.clusters":
        return "cluster_probe.centroids"
    module, leaf = reference.rsplit(".", 1)
    return f"{REFERENCE_NAMES[module]}.{leaf}"


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def reference_config(g: dict[str, np.ndarray]) -> Config:
    """The recorded settings; dropout 0 as the recorded run (the only randomness left is the draw)."""
    scalar = {key: g[key].item() for key in g if g[key].ndim == 0}
    return Config().override([
        "train.device=cpu", "train.amp=none", "method.dropout=0.0",
        f"method.dim={scalar['dim']}", f"method.n_classes={scalar['n_classes']}", f"method.rho={scalar['rho']}",
        f"method.tau={scalar['tau']}", f"method.tau_base={scalar['base_tau']}", f"method.alpha={scalar['alpha']}",
        f"method.ema_momentum={scalar['ema_momentum']}", f"method.sigma={scalar['sigma']}",
        f"method.reweighting={str(bool(scalar['reweighting'])).lower()}", f"method.warmup={scalar['warmup']}",
        f"optim.head_lr={scalar['head_lr']}", f"optim.head_weight_decay={scalar['head_weight_decay']}",
        f"optim.projection_lr={scalar['projection_lr']}", f"optim.linear_lr={scalar['linear_lr']}",
        f"optim.cluster_lr={scalar['cluster_lr']}", f"optim.grad_clip={scalar['grad_clip']}",
    ])


def step_inputs(g: dict[str, np.ndarray], step: int, sigma: float) -> StepInputs:
    """What a feature source serves at ``step``: the LHP weights come from the recorded
    pre-softmax attention scores through hpseg's own processing."""
    features = torch.from_numpy(g["image_features"][step])
    grid = (features.shape[-2], features.shape[-1])
    scores = torch.from_numpy(g["image_attention"][step])
    weights = attention_neighbour_weights(scores, grid, num_prefix_tokens=1, sigma=sigma)
    return StepInputs(features, weights, torch.from_numpy(g["labels"][step]).long(),
                      torch.from_numpy(g["aug_features"][step]))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_training_steps_match_reference(path):
    g = load(path)
    config = reference_config(g)
    learner = build_learner(config, g["image_features"].shape[2], resolve_device("cpu"), None)
    model = learner.model
    init = {hpseg_name(k[len("init/"):]): torch.from_numpy(v) for k, v in g.items() if k.startswith("init/")}
    init.update({name.replace("segmentation.", "ema_segmentation.", 1): value
                 for name, value in init.items() if name.startswith("segmentation.")})  # S' starts as S
    model.load_state_dict(init, strict=True)
    pools = ThresholdPools(torch.from_numpy(g["pool_ag"]), torch.from_numpy(g["pool_sp"]))

    # With α = 0 the consistency loss is not computed (absent from the step's values), so only
    # compared where α > 0.
    compared = {key: name for key, name in LOSSES.items() if name != "consistency" or config.method.alpha > 0}
    measured = {key: [] for key in [*compared, "grad_norm"]}
    for step in range(int(g["steps"])):
        draw = SharedContrastPattern.from_uniform(torch.from_numpy(g["uniform"][step]), config.method.rho)
        values = training_step(learner, step_inputs(g, step, config.method.sigma), pools, draw,
                               float(g["lmbd"][step]))
        assert ("consistency" in values) == (config.method.alpha > 0)
        for key, name in compared.items():
            measured[key].append(values[name])
        measured["grad_norm"].append(values["grad_norm"])

    # Measured: losses 5e-7 relative at most, clip norms 4e-7, final weights 1.5e-6.
    for key in compared:
        np.testing.assert_allclose(measured[key], g[key], rtol=1e-3, err_msg=key)
    np.testing.assert_allclose(measured["grad_norm"], g["grad_norm"], rtol=2e-3)
    state = model.state_dict()
    for key, value in g.items():
        if key.startswith("final/"):
            name = hpseg_name(key[len("final/"):])
            assert relative(state[name], torch.from_numpy(value)) < 1e-3, name

    # A renewal of the task-specific pool: S' on the recorded features, one recorded patch per
    # image (the authors' random pick), through hpseg's pool code.
    with torch.no_grad():
        maps = specific_pool_maps(model, config.method, torch.from_numpy(g["pool_image_features"]))
    picks = torch.from_numpy(g["pool_patch_index"])
    renewed = fill_pool([picked_patches(maps, picks)], pool_size=maps.shape[0])
    # The reference stores its pools in float16 (measured: 3.7e-4 at most, float16 rounding).
    torch.testing.assert_close(renewed, torch.from_numpy(g["pool_sp_renewed"]), rtol=0, atol=1e-3)
