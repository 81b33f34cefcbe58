"""The method and the backbone reproduce the authors' reference implementation (tests/data, see
README there): ``hp_*.npz`` the method functions, ``backbone_*.npz`` the reference's own DINO ViT
(features at several sizes, last-block attention scores before the softmax).

Further golden files of the same names in the folder named by ``HPSEG_EXTRA_GOLDEN`` (when set) are
checked too, each as its own test case, so that new reference values need no change of code.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from hpseg.method import (
    SharedContrastPattern,
    attention_neighbour_weights,
    hidden_positive_loss,
    propagate_to_neighbours,
)
from tests.helpers import BACKBONE_GOLDEN, DATA, EXTRA_GOLDEN, GOLDEN, golden_id, load_golden


def test_golden_files_present():
    assert [p.name for p in sorted(DATA.glob("hp_*.npz"))] == ["hp_a.npz", "hp_b.npz", "hp_c.npz"]
    assert [p.name for p in sorted(DATA.glob("backbone_*.npz"))] == ["backbone_a.npz", "backbone_b.npz"]


@pytest.mark.parametrize("path", GOLDEN, ids=golden_id)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_loss_and_gradients_match_reference(path, chunk_size):
    g = load_golden(path)
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
    g = load_golden(path)
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


# ------------------------------------------------------------------------------ the backbone


def _reference_backbone(g: dict, tmp_path: Path):
    """hpseg's DINO-style ViT of the file's architecture, its weights saved as DINO's checkpoint
    layout to a real .pth file and read back through hpseg's weight loading."""
    import dataclasses

    from hpseg.backbones import create_backbone, get_spec

    teacher = {"module.backbone." + key[len("teacher/module.backbone."):]: value
               for key, value in g.items() if key.startswith("teacher/")}
    path = tmp_path / "dino_reference.pth"
    torch.save({"teacher": teacher}, path)
    dims = {k: int(g[k]) for k in ("patch", "embed_dim", "depth", "heads", "img_size")}
    spec = get_spec("vit_tiny_p8")  # DINO-style: class token, no registers, DINO's interpolation
    if (dims["patch"], dims["embed_dim"], dims["depth"], dims["heads"], dims["img_size"]) != (8, 64, 2, 4, 32):
        spec = dataclasses.replace(
            spec, name=f"golden_{path.stem}", patch_size=dims["patch"], embed_dim=dims["embed_dim"],
            num_heads=dims["heads"], depth=dims["depth"],
            timm_kwargs=(("patch_size", dims["patch"]), ("embed_dim", dims["embed_dim"]), ("depth", dims["depth"]),
                         ("num_heads", dims["heads"]), ("img_size", dims["img_size"])),
        )
    return create_backbone(spec, weights=path)


def _sizes(g: dict) -> list[str]:
    """The input sizes a backbone golden file holds, from its keys: ``image_32`` (square) and
    ``image_48x80`` (48 rows, 80 columns) give ``["32", "48x80"]``."""
    return sorted(key[len("image_"):] for key in g if key.startswith("image_"))


def _rows_columns(size: str) -> tuple[int, int]:
    rows, _, columns = size.partition("x")
    return int(rows), int(columns or rows)


def test_sizes_are_read_from_the_keys():
    g = {"image_32": 0, "image_48x80": 0, "image_88x40": 0, "features_32": 0, "teacher/x": 0}
    assert _sizes(g) == ["32", "48x80", "88x40"]
    assert [_rows_columns(s) for s in _sizes(g)] == [(32, 32), (48, 80), (88, 40)]


class _GoldenImages(Dataset):
    """The reference's (already normalised) input images, as training crops."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": torch.full(self.images.shape[-2:], -1, dtype=torch.int64)}


@pytest.mark.parametrize("path", BACKBONE_GOLDEN, ids=golden_id)
def test_backbone_features_match_reference_at_every_size(path: Path, tmp_path: Path):
    """Features at the native and at interpolated sizes (DINO's own interpolation) and the
    pre-softmax attention scores of the last block."""
    g = load_golden(path)
    backbone = _reference_backbone(g, tmp_path)
    assert len(_sizes(g)) >= 2
    for size in _sizes(g):
        out = backbone(g[f"image_{size}"], with_attention=True)
        expected = g[f"features_{size}"]
        assert ((out.features - expected).norm() / expected.norm()).item() < 1e-5, size
        scores = g[f"attention_logits_{size}"]
        torch.testing.assert_close(out.attention_scores, scores, rtol=1e-5, atol=1e-5 * scores.abs().max().item())


@pytest.mark.parametrize("path", BACKBONE_GOLDEN, ids=golden_id)
def test_training_lhp_weights_match_reference(path: Path, tmp_path: Path):
    """The LHP neighbour weights training uses -- through BackboneFeatures (the on-the-fly path)
    and the feature cache builder -- equal those derived from the reference's stored scores."""
    from hpseg.training.cache import CachedFeatures, build_feature_cache
    from hpseg.training.features import BackboneFeatures

    g = load_golden(path)
    backbone = _reference_backbone(g, tmp_path)
    sigma = 28.0
    for size in _sizes(g):
        rows, columns = _rows_columns(size)
        grid = (rows // backbone.patch_size, columns // backbone.patch_size)
        images = g[f"image_{size}"]
        expected = attention_neighbour_weights(g[f"attention_logits_{size}"], grid, 1, sigma)
        assert expected.abs().max() > 0
        source = BackboneFeatures(backbone, str(_prepared(tmp_path)), with_augmented=False, sigma=sigma,
                                  device=torch.device("cpu"), amp_dtype=None)
        source.dataset = _GoldenImages(images)
        (step,) = list(source.steps([list(range(len(images)))], seeds=[0]))
        torch.testing.assert_close(step.neighbour_weights, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.features, g[f"features_{size}"], rtol=1e-4, atol=1e-5)
    # The cache builder stores what BackboneFeatures computes on the same crops (float32 cache).
    prepared = _prepared(tmp_path)
    cache_dir = build_feature_cache(backbone, prepared, tmp_path / "cache", sigma=sigma, dtype="float32",
                                    device=torch.device("cpu"), batch_size=4)
    (cached,) = list(CachedFeatures(cache_dir, prepared, with_augmented=False, device=torch.device("cpu"))
                     .steps([[0, 1, 2]], seeds=[0]))
    (live,) = list(BackboneFeatures(backbone, str(prepared), with_augmented=False, sigma=sigma,
                                    device=torch.device("cpu"), amp_dtype=None).steps([[0, 1, 2]], seeds=[0]))
    torch.testing.assert_close(cached.neighbour_weights, live.neighbour_weights, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached.features, live.features, rtol=0, atol=0)


def _prepared(tmp_path: Path) -> Path:
    from tests.helpers import synthetic_prepared

    return synthetic_prepared(tmp_path) / "hpseg_prepared" / "train_32"
