"""Label-free criteria for the number of clusters (hpseg.evaluation.clusters), texture mosaics, `hpseg clusters`."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hpseg.cli.main import main
from hpseg.data import make_synthetic_dataset
from hpseg.evaluation.clusters import (
    adjusted_rand_index,
    cluster_sweep,
    davies_bouldin,
    laplacian_spectrum,
    normalized_mutual_information,
    parse_k_range,
    silhouette,
    suggest_k,
)

T = torch.tensor


def test_nmi_and_ari_by_hand():
    assert normalized_mutual_information(T([0, 0, 1, 1]), T([1, 1, 0, 0])) == pytest.approx(1.0)  # renamed
    assert normalized_mutual_information(T([0, 0, 1, 1]), T([0, 1, 0, 1])) == pytest.approx(0.0)  # independent
    # contingency all ones: sum C(n_ij, 2) = 0, rows and columns 2 each, expected 2 * 2 / C(4, 2) = 2/3
    assert adjusted_rand_index(T([0, 0, 1, 1]), T([0, 1, 0, 1])) == pytest.approx((0 - 2 / 3) / (2 - 2 / 3))
    assert adjusted_rand_index(T([2, 2, 0, 1]), T([5, 5, 3, 4])) == pytest.approx(1.0)


def test_silhouette_by_hand():
    x = T([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert silhouette(x, T([0, 0, 1, 1])) == pytest.approx(1.0)  # a = 0, b = 1 for every point
    # the third point alone in its cluster scores 0; the other two a = 0, b = 1
    assert silhouette(x[:3], T([0, 0, 1])) == pytest.approx(2 / 3)
    # a bad split, one point of each direction per cluster: a = 1 (the other member), b = 1/2
    assert silhouette(x, T([0, 1, 0, 1])) == pytest.approx((0.5 - 1.0) / 1.0)


def test_davies_bouldin_by_hand():
    x = T([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0], [-0.6, -0.8]])
    # centroids (0.8, 0.4) and (-0.8, -0.4); spreads sqrt(0.2) each; separation sqrt(3.2)
    assert davies_bouldin(x, T([0, 0, 1, 1])) == pytest.approx(2 * math.sqrt(0.2) / math.sqrt(3.2))


def test_eigengap_counts_disconnected_groups():
    x = torch.eye(3).repeat_interleave(6, dim=0) + 0.01 * torch.rand(18, 3, generator=torch.Generator().manual_seed(0))
    eigenvalues = laplacian_spectrum(x, n_neighbours=4)
    assert eigenvalues[:3].abs().max() < 1e-6 and eigenvalues[3] > 0.5  # three components, then a jump


def blobs(k: int, n: int = 600, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(16, k, generator=g))[0].T  # orthonormal directions
    return centres[torch.randint(k, (n,), generator=g)] + 0.15 * torch.randn(n, 16, generator=g)


@pytest.mark.parametrize("k", [3, 5])
def test_sweep_finds_separated_blobs(k):
    rows = cluster_sweep(blobs(k), range(2, 9), max_patches=400, n_restarts=2)
    assert [r["k"] for r in rows] == list(range(2, 9))
    for criterion in ("silhouette", "davies_bouldin", "eigengap"):
        assert suggest_k(rows, criterion) == k, criterion
    assert next(r for r in rows if r["k"] == k)["stability"] > 0.9


def test_parse_k_range_and_errors():
    assert parse_k_range("2..5") == [2, 3, 4, 5]
    assert parse_k_range("8,3,3") == [3, 8]
    with pytest.raises(ValueError, match="at least 2"):
        parse_k_range("1..4")
    with pytest.raises(ValueError, match="LOW..HIGH"):
        parse_k_range("two")
    with pytest.raises(ValueError, match="unknown criterion"):
        suggest_k([{"k": 2, "silhouette": 0.1}], "gap")


def test_texture_mosaic_has_exact_labels(tmp_path):
    pytest.importorskip("skimage")
    from hpseg.data.mosaic import make_texture_mosaic_dataset

    out = make_texture_mosaic_dataset(tmp_path / "m", n_train=4, n_val=4, size=32, n_classes=4, seed=1)
    assert (out / "classes.txt").read_text().split() == ["brick", "grass", "gravel", "coffee"]
    labels = [np.array(Image.open(out / "train" / "labels" / f"{i:05d}.png")) for i in range(4)]
    assert sorted(set(np.concatenate([lab.ravel() for lab in labels]).tolist())) == [0, 1, 2, 3]
    image = np.array(Image.open(out / "train" / "images" / "00000.png"))
    grey = labels[0] != 3  # brick, grass and gravel are grey photographs; coffee is in colour
    assert np.all(image[grey][:, 0] == image[grey][:, 1])
    again = make_texture_mosaic_dataset(tmp_path / "n", n_train=4, n_val=4, size=32, n_classes=4, seed=1)
    assert (again / "val" / "images" / "00002.png").read_bytes() == (out / "val" / "images" / "00002.png").read_bytes()
    with pytest.raises(ValueError, match="n_classes"):
        make_texture_mosaic_dataset(tmp_path / "x", n_classes=99)


def test_clusters_command_on_unlabelled_images(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "data", n_train=4, n_val=0, size=32, n_classes=3, seed=0)
    out = tmp_path / "out"
    assert main(["clusters", "vit_tiny_p8", "--random-backbone", "--data-root", str(data), "--k", "2..4",
                 "--size", "32", "--out", str(out)]) == 0
    report = json.loads((out / "clusters.json").read_text())
    assert [r["k"] for r in report["rows"]] == [2, 3, 4] and report["n_patches"] == 4 * 16
    assert report["suggested_k"] == report["suggested_k_by_criterion"]["silhouette"]
    assert "random" in report["features"] and (out / "clusters.png").exists()
    assert "suggested K" in capsys.readouterr().out
