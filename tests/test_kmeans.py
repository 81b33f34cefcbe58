"""Tests of hpseg.evaluation.kmeans: blob recovery, determinism, chunking invariance, empty clusters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpseg.evaluation.kmeans import assign, kmeans
from hpseg.evaluation.metrics import SegmentationMetrics, confusion_matrix, hungarian_match


def _blobs(k: int = 5, per: int = 200, dim: int = 16, spread: float = 0.05, seed: int = 0):
    """k well-separated blobs around random unit directions (also well separated in angle)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1) * 4.0
    truth = torch.arange(k).repeat_interleave(per)
    x = centres[truth] + spread * torch.randn(k * per, dim, generator=g)
    order = torch.randperm(k * per, generator=g)
    return x[order], truth[order]


@pytest.mark.parametrize("cosine", [True, False])
def test_recovers_blobs(cosine):
    x, truth = _blobs(per=100)
    centroids, labels = kmeans(x, 5, seed=0, cosine=cosine)
    assert centroids.shape == (5, 16) and labels.shape == (500,) and labels.dtype == torch.int64
    m = SegmentationMetrics(5)
    m.update(labels, truth)
    assert m.compute()["accuracy"] == 1.0
    if cosine:
        assert torch.allclose(centroids.norm(dim=1), torch.ones(5), atol=1e-5)
    # matched centroids sit on the blob centres
    mapping = hungarian_match(confusion_matrix(labels, truth, 5, 5))
    for cluster, cls in enumerate(mapping):
        member_mean = x[truth == int(cls)].mean(0)
        target = F.normalize(member_mean, dim=0) if cosine else member_mean
        assert torch.allclose(centroids[cluster], target, atol=1e-2)


def test_assign_matches_kmeans_labels():
    x, _ = _blobs(per=60, seed=3)
    centroids, labels = kmeans(x, 5, seed=1)
    assert assign(x, centroids).equal(labels)
    assert assign(x, centroids, chunk_size=64).equal(labels)


def test_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 8, generator=g)  # no structure: results depend on the seed
    c1, l1 = kmeans(x, 7, seed=11, iters=15)
    c2, l2 = kmeans(x, 7, seed=11, iters=15)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    c3, _ = kmeans(x, 7, seed=12, iters=0)
    c4, _ = kmeans(x, 7, seed=11, iters=0)
    assert not torch.equal(c3, c4)
    # random init: k distinct rows, reproducible
    r1, _ = kmeans(x, 7, seed=3, init="random", iters=0)
    r2, _ = kmeans(x, 7, seed=3, init="random", iters=0)
    assert torch.equal(r1, r2) and len({tuple(r.tolist()) for r in r1}) == 7


@pytest.mark.parametrize("cosine", [True, False])
def test_chunking_gives_same_result(cosine):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 12, generator=g)
    c_full, l_full = kmeans(x, 6, seed=4, cosine=cosine, iters=10, chunk_size=10**6)
    c_chunk, l_chunk = kmeans(x, 6, seed=4, cosine=cosine, iters=10, chunk_size=64)
    assert torch.equal(l_full, l_chunk)
    assert torch.allclose(c_full, c_chunk, atol=1e-6)


def test_empty_cluster_reseeded_from_farthest_point():
    # Two tight groups and one far outlier; an initial centre nowhere near any point is empty
    # after the first assignment and must be moved onto the farthest point (the outlier).
    x = torch.cat([torch.zeros(10, 2), torch.ones(10, 2) * 0.1, torch.tensor([[5.0, 5.0]])])
    x = x + torch.linspace(0, 1e-3, 21).unsqueeze(1)
    init = torch.tensor([[0.0, 0.0], [0.1, 0.1], [-50.0, 50.0]])
    centroids, labels = kmeans(x, 3, cosine=False, init=init)
    assert torch.bincount(labels, minlength=3).min() >= 1
    assert labels[-1] != labels[0] and labels[-1] != labels[10]
    assert torch.allclose(centroids[labels[-1]], x[-1], atol=1e-5)


def test_half_precision_and_bad_args():
    x, truth = _blobs(k=3, per=50)
    _, labels = kmeans(x.half(), 3)
    m = SegmentationMetrics(3)
    m.update(labels, truth)
    assert m.compute()["accuracy"] == 1.0
    with pytest.raises(ValueError):
        kmeans(x, 0)
    with pytest.raises(ValueError):
        kmeans(x, 3, init="nope")
    with pytest.raises(ValueError):
        kmeans(x, 3, init=torch.zeros(2, 16))
