"""Vectorised (cosine) k-means in torch.

Used for the paper's "DINO baseline" (spec §8: the evaluation protocol applied to k-means
clusters of the raw backbone features) and available for users' own clustering.

* ``cosine=True`` (default) is spherical k-means: features and centroids are L2-normalised and
  points go to the centroid of highest cosine similarity; centroids are the normalised means.
* ``cosine=False`` is ordinary Euclidean (Lloyd) k-means.

Distances are computed in chunks of rows so that ``N`` around 1e6 with ``C = 384`` fits in
memory (nothing ``N x C`` is copied, nothing ``N x k`` is materialised); the features are never
normalised in place. Everything runs on the features' device; randomness comes from a CPU
``torch.Generator`` seeded with ``seed`` so results are reproducible for a given seed and
independent of the chunk size (up to floating-point summation order).

Shapes: features ``(N, C)``, centroids ``(k, C)``, assignment ``(N,)`` int64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["assign", "kmeans"]

DEFAULT_CHUNK = 65536


def _pass(
    features: Tensor, centroids: Tensor, cosine: bool, chunk_size: int, accumulate: bool = True
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One sweep over the rows: nearest centroid, distance to it and, with ``accumulate``,
    the per-cluster sums ``(k, C)`` and counts ``(k,)`` of the (normalised) rows.

    Assigning and accumulating in the same sweep reads (and normalises) each chunk only once
    per Lloyd iteration, which dominates the cost for large N.
    """
    n = features.shape[0]
    k, c = centroids.shape
    labels = torch.empty(n, dtype=torch.long, device=features.device)
    dist = torch.empty(n, dtype=torch.float32, device=features.device)
    # float64 accumulators: the sums then barely depend on chunking or summation order.
    sums = torch.zeros(k, c, dtype=torch.float64, device=features.device) if accumulate else None
    counts = torch.zeros(k, dtype=torch.float64, device=features.device) if accumulate else None
    for start in range(0, n, chunk_size):
        x = features[start : start + chunk_size].float()
        if cosine:
            x = F.normalize(x, dim=1)
            best, idx = (x @ centroids.T).max(dim=1)
            d = 1.0 - best
        else:
            # argmax of 2x.c - |c|^2 is the nearest centre (|x|^2 is constant per row), and
            # |x|^2 - (2x.c - |c|^2) = |x - c|^2.
            best, idx = (2.0 * (x @ centroids.T) - (centroids * centroids).sum(dim=1)).max(dim=1)
            d = (x * x).sum(dim=1) - best
        labels[start : start + chunk_size] = idx
        dist[start : start + chunk_size] = d.clamp_(min=0.0)
        if sums is not None and counts is not None:
            if x.device.type == "cpu":
                sums.index_add_(0, idx, x.double())
            else:  # index_add_ adds with atomics on GPUs, in no fixed order: runs would differ
                sums += F.one_hot(idx, k).double().T @ x.double()
            counts += torch.bincount(idx, minlength=k)
    return labels, dist, sums, counts


def _distance_to(features: Tensor, point: Tensor, cosine: bool, chunk_size: int) -> Tensor:
    """Distance of every row to one point ``(C,)``: ``1 - cos`` or squared L2, chunked."""
    out = torch.empty(features.shape[0], dtype=torch.float32, device=features.device)
    for start in range(0, features.shape[0], chunk_size):
        x = features[start : start + chunk_size].float()
        if cosine:
            out[start : start + chunk_size] = 1.0 - F.normalize(x, dim=1) @ point
        else:
            out[start : start + chunk_size] = ((x - point) ** 2).sum(dim=1)
    return out.clamp_(min=0.0)


def _row(features: Tensor, i: int, cosine: bool) -> Tensor:
    x = features[i].float()
    return F.normalize(x, dim=0) if cosine else x


def _sample_index(weights: Tensor, gen: torch.Generator) -> int:
    """Index drawn with probability proportional to ``weights`` (works for any N, any device)."""
    # cumsum + searchsorted: torch.multinomial caps the number of categories at 2**24.
    cdf = torch.cumsum(weights.double(), dim=0)
    total = float(cdf[-1])
    if not total > 0.0:  # all points coincide with chosen centres: any index will do
        return int(torch.randint(weights.numel(), (1,), generator=gen))
    r = torch.rand(1, generator=gen, dtype=torch.float64).item() * total
    idx = int(torch.searchsorted(cdf, torch.tensor([r], dtype=torch.float64, device=cdf.device)))
    return min(idx, weights.numel() - 1)


def _init_kmeanspp(features: Tensor, k: int, cosine: bool, gen: torch.Generator, chunk_size: int) -> Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)."""
    n = features.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [_row(features, first, cosine)]
    # For unit vectors 1 - cos = |x - c|^2 / 2, so this is the D^2 weighting of k-means++.
    min_d = _distance_to(features, centres[0], cosine, chunk_size)
    for _ in range(1, k):
        idx = _sample_index(min_d, gen)
        centres.append(_row(features, idx, cosine))
        min_d = torch.minimum(min_d, _distance_to(features, centres[-1], cosine, chunk_size))
    return torch.stack(centres)


def assign(
    features: Tensor, centroids: Tensor, cosine: bool = True, *, chunk_size: int = DEFAULT_CHUNK
) -> Tensor:
    """Nearest centroid of each row.

    Args:
        features: ``(N, C)``.
        centroids: ``(k, C)`` (normalised internally when ``cosine``).
        cosine: highest cosine similarity instead of smallest Euclidean distance.
        chunk_size: rows per distance block (memory ``chunk_size x k``).

    Returns:
        ``(N,)`` int64 cluster ids on ``features``' device.
    """
    if features.ndim != 2 or centroids.ndim != 2 or features.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"features (N, C) and centroids (k, C) expected, got {features.shape}, {centroids.shape}"
        )
    cen = centroids.to(features.device).float()
    if cosine:
        cen = F.normalize(cen, dim=1)
    labels, _, _, _ = _pass(features, cen, cosine, chunk_size, accumulate=False)
    return labels


def kmeans(
    features: Tensor,
    k: int,
    *,
    iters: int = 50,
    seed: int = 0,
    cosine: bool = True,
    init: str | Tensor = "k-means++",
    chunk_size: int = DEFAULT_CHUNK,
    tol: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Cluster rows of ``features`` into ``k`` groups.

    Args:
        features: ``(N, C)`` float features (any float dtype; computed in float32), ``N >= k``.
        k: number of clusters.
        iters: maximum Lloyd iterations; stops earlier once assignments stop changing
            (or fewer than ``tol * N`` points change).
        seed: seed of the initialisation (everything after it is deterministic).
        cosine: spherical k-means on L2-normalised features (returned centroids are unit norm).
        init: ``"k-means++"``, ``"random"`` (k distinct random rows) or a ``(k, C)`` tensor.
        chunk_size: rows per distance block; bounds memory, not the result.
        tol: fraction of points allowed to change assignment at convergence.

    Returns:
        ``(centroids (k, C) float32, assignment (N,) int64)`` on ``features``' device; the
        assignment is that of the returned centroids.

    Empty clusters are re-seeded with the points farthest from their current centroid.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, C), got {tuple(features.shape)}")
    n, c = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= N, got k={k}, N={n}")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    gen = torch.Generator().manual_seed(int(seed))

    if isinstance(init, Tensor):
        if tuple(init.shape) != (k, c):
            raise ValueError(f"init centroids must be ({k}, {c}), got {tuple(init.shape)}")
        centroids = init.to(features.device).float().clone()
        if cosine:
            centroids = F.normalize(centroids, dim=1)
    elif init == "k-means++":
        centroids = _init_kmeanspp(features, k, cosine, gen, chunk_size)
    elif init == "random":
        idx = torch.randperm(n, generator=gen)[:k].to(features.device)
        centroids = features[idx].float()
        if cosine:
            centroids = F.normalize(centroids, dim=1)
    else:
        raise ValueError(f"init must be 'k-means++', 'random' or a tensor, got {init!r}")

    labels, dist, sums, counts = _pass(features, centroids, cosine, chunk_size)
    for _ in range(iters):
        assert sums is not None and counts is not None
        empty = (counts == 0).nonzero().flatten()
        new = (sums / counts.clamp(min=1.0).unsqueeze(1)).float()
        if empty.numel():
            # Farthest points are the worst-served ones; giving each its own centre is the usual
            # remedy and keeps the run deterministic (topk, no sampling).
            far = torch.topk(dist, empty.numel()).indices
            new[empty] = features[far].float()
        if cosine:
            new = F.normalize(new, dim=1)
        centroids = new
        new_labels, dist, sums, counts = _pass(features, centroids, cosine, chunk_size)
        changed = int((new_labels != labels).sum())
        labels = new_labels
        if changed <= tol * n and not empty.numel():
            break
    return centroids, labels
