"""How many clusters do unlabelled images hold? Label-free clustering criteria (``hpseg clusters``).

For each K of a range, patch features (N, C) are clustered with cosine k-means and scored
without any label by:

* ``silhouette`` (higher is better): mean over patches of (b - a) / max(a, b), a = mean cosine
  distance to the patch's own cluster, b = to the nearest other cluster;
* ``davies_bouldin`` (lower is better): mean over clusters of the worst ratio of summed
  within-cluster spreads to the distance between centroids;
* ``stability`` (higher is better): mean adjusted Rand index between k-means runs of different
  seeds -- a K the data supports is found again from another start;
* ``eigengap`` (higher is better): the gap lambda_{K+1} - lambda_K of the normalised Laplacian of a
  k-nearest-neighbour cosine-affinity graph of the patches; K well-separated groups give K
  eigenvalues near 0 and then a jump.

Which one makes the suggestion is the ``criterion`` argument; its default is the criterion that
found the true number of classes most often on data with known classes
(``benchmarks/cluster_count.py``, docs/results.md "How many clusters?").

All functions are pure and vectorised: features ``(N, C)`` float, labels ``(N,)`` int64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hpseg.backbones import Backbone, create_backbone
from hpseg.checkpoints.sources import names_a_source
from hpseg.checkpoints.trained import load_trained
from hpseg.data import ValCrops, build_raw_dataset
from hpseg.errors import InvalidInputError
from hpseg.evaluation.kmeans import kmeans
from hpseg.files import OutputFolder, atomic_write, holds_only, write_json_atomic
from hpseg.logs import progress_bar
from hpseg.runtime import resolve_device

logger = logging.getLogger(__name__)

__all__ = [
    "CRITERIA",
    "DEFAULT_CRITERION",
    "adjusted_rand_index",
    "cluster_sweep",
    "davies_bouldin",
    "laplacian_spectrum",
    "normalized_mutual_information",
    "parse_k_range",
    "silhouette",
    "suggest_k",
]

#: criterion -> True when higher is better.
CRITERIA: dict[str, bool] = {"silhouette": True, "davies_bouldin": False, "stability": True, "eigengap": True}
#: The criterion that decides the suggestion by default (chosen on the measurements in docs/results.md).
DEFAULT_CRITERION = "silhouette"


def contingency(a: Tensor, b: Tensor) -> Tensor:
    """(N,), (N,) non-negative ids -> (max a + 1, max b + 1) int64 co-occurrence counts."""
    a, b = a.reshape(-1).long().cpu(), b.reshape(-1).long().cpu()
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    return torch.bincount(a * nb + b, minlength=na * nb).reshape(na, nb)


def _entropy(counts: Tensor) -> float:
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


def normalized_mutual_information(a: Tensor, b: Tensor) -> float:
    """NMI of two labelings of the same N items, normalised by the mean of their entropies.

    1 = the same partition (up to renaming), 0 = independent; 1 when both are a single cluster.
    """
    table = contingency(a, b).double()
    n = table.sum()
    ha, hb = _entropy(table.sum(1)), _entropy(table.sum(0))
    if ha == 0.0 and hb == 0.0:
        return 1.0
    nz = table > 0
    outer = table.sum(1, keepdim=True) * table.sum(0, keepdim=True)
    mi = float((table[nz] / n * (table[nz] * n / outer[nz]).log()).sum())
    return mi / (0.5 * (ha + hb)) if ha + hb > 0 else 0.0


def adjusted_rand_index(a: Tensor, b: Tensor) -> float:
    """Adjusted Rand index of two labelings (1 = identical partitions, about 0 = chance)."""
    table = contingency(a, b).double()

    def pairs(x: Tensor) -> Tensor:
        return (x * (x - 1) / 2).sum()

    n = table.sum()
    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2)
    maximum = 0.5 * (rows + cols)
    if float(maximum - expected) == 0.0:
        return 1.0
    return float((index - expected) / (maximum - expected))


def silhouette(features: Tensor, labels: Tensor) -> float:
    """Mean silhouette with cosine distance 1 - cos; patches alone in their cluster score 0.

    features (N, C), labels (N,) ids; needs at least 2 clusters. Memory N x N.
    """
    x = F.normalize(features.float(), dim=1)
    labels = labels.long()
    k = int(labels.max()) + 1
    one_hot = F.one_hot(labels, k).float()  # (N, K)
    sizes = one_hot.sum(0)  # (K,)
    sums = (1.0 - x @ x.T).clamp_(min=0.0) @ one_hot  # (N, K) summed distances to each cluster
    own = sizes[labels]
    a = sums.gather(1, labels[:, None]).squeeze(1) / (own - 1).clamp(min=1)
    other = (sums / sizes.clamp(min=1)).masked_fill(one_hot.bool() | (sizes == 0)[None], float("inf"))
    b = other.min(1).values
    s = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp(min=1e-12), torch.zeros_like(a))
    return float(s[torch.isfinite(s)].mean())


def davies_bouldin(features: Tensor, labels: Tensor) -> float:
    """Davies-Bouldin index on L2-normalised features (lower = compacter, better separated).

    features (N, C), labels (N,) ids; empty cluster ids are ignored.
    """
    x = F.normalize(features.float(), dim=1)
    labels = labels.long()
    k = int(labels.max()) + 1
    one_hot = F.one_hot(labels, k).float()
    sizes = one_hot.sum(0)
    present = sizes > 0
    centres = (one_hot.T @ x)[present] / sizes[present, None]  # (K', C)
    spread = (one_hot[:, present] * (x[:, None, :] - centres[None]).norm(dim=2)).sum(0) / sizes[present]
    separation = torch.cdist(centres, centres)
    ratio = (spread[:, None] + spread[None]) / separation.clamp(min=1e-12)
    ratio.fill_diagonal_(float("-inf"))
    return float(ratio.max(1).values.mean()) if centres.shape[0] > 1 else float("inf")


def laplacian_spectrum(features: Tensor, n_neighbours: int = 10) -> Tensor:
    """Ascending eigenvalues (N,) of the symmetric normalised Laplacian of a kNN cosine graph.

    Each patch is joined to its ``n_neighbours`` most similar patches with weight
    max(cos, 0); the graph is made symmetric with the larger of the two directed weights.
    """
    x = F.normalize(features.double(), dim=1)
    similarity = (x @ x.T).clamp(min=0.0)
    similarity.fill_diagonal_(0.0)
    k = min(n_neighbours, x.shape[0] - 1)
    top = similarity.topk(k, dim=1)
    affinity = torch.zeros_like(similarity).scatter_(1, top.indices, top.values)
    affinity = torch.maximum(affinity, affinity.T)
    inv_sqrt = affinity.sum(1).clamp(min=1e-12).rsqrt()
    laplacian = torch.eye(x.shape[0], dtype=x.dtype) - inv_sqrt[:, None] * affinity * inv_sqrt[None]
    return torch.linalg.eigvalsh(laplacian).clamp(min=0.0)


def parse_k_range(text: str, max_patches: int = 2000) -> list[int]:
    """``"2..40"`` or ``"3,5,8"`` -> sorted distinct Ks, each in 2 .. ``max_patches`` - 1 (k-means
    of the ``max_patches`` patches sampled needs fewer clusters than patches). ValueError naming
    ``--k`` or ``--max-patches`` otherwise, before any list is built (``2..10**12`` is refused, not
    allocated)."""
    if max_patches < 3:
        raise InvalidInputError(f"--max-patches {max_patches}: at least 3 patches are needed to score K = 2 (default 2000)")
    is_range = ".." in text
    try:
        ks = [int(v) for v in (text.split("..") if is_range else text.split(",")) if v.strip()]
    except ValueError:
        ks = []
    if not ks or (is_range and len(ks) != 2):
        raise InvalidInputError(f"--k {text!r}: expected a range LOW..HIGH (e.g. 2..40) or a list like 3,5,8")
    if is_range and ks[0] > ks[1]:
        raise InvalidInputError(f"--k {text!r}: the range is reversed; write LOW..HIGH ({ks[1]}..{ks[0]})")
    low, high = min(ks), max(ks)
    if low < 2:
        raise InvalidInputError(f"--k {text!r}: every K must be at least 2 (a single cluster cannot be scored)")
    if high >= max_patches:
        raise InvalidInputError(f"--k {text!r}: K = {high} needs more than the {max_patches} patches sampled "
                         "(--max-patches): every K must be below --max-patches")
    return list(range(low, high + 1)) if is_range else sorted(set(ks))


def cluster_sweep(features: Tensor, ks: Sequence[int], *, seed: int = 0, max_patches: int = 2000,
                  n_restarts: int = 3, n_neighbours: int = 10) -> list[dict[str, Any]]:
    """Score cosine k-means of ``features`` (N, C) for every K in ``ks``, without labels.

    A random sample of ``max_patches`` rows (fixed by ``seed``) is clustered ``n_restarts``
    times per K (seeds seed .. seed + n_restarts - 1); the run of lowest within-cluster distance
    gives silhouette and Davies-Bouldin, the runs' mean pairwise ARI gives stability. Returns
    one dict per K: ``k``, ``silhouette``, ``davies_bouldin``, ``stability``, ``eigengap``.
    """
    generator = torch.Generator().manual_seed(seed)
    if features.shape[0] > max_patches:
        features = features[torch.randperm(features.shape[0], generator=generator)[:max_patches]]
    features = features.float().cpu()
    too_many = [k for k in ks if k >= features.shape[0]]
    if too_many:
        raise InvalidInputError(f"K={too_many[0]} needs more than {features.shape[0]} patches: use fewer clusters or more images")
    eigenvalues = laplacian_spectrum(features, n_neighbours)
    rows = []
    for k in ks:
        runs = [kmeans(features, k, seed=seed + r, cosine=True) for r in range(n_restarts)]
        inertia = [float((1 - (F.normalize(features, dim=1) * c[a]).sum(1)).sum()) for c, a in runs]
        best = runs[min(range(n_restarts), key=inertia.__getitem__)][1]
        agreement = [adjusted_rand_index(runs[i][1], runs[j][1])
                     for i in range(n_restarts) for j in range(i + 1, n_restarts)]
        rows.append({
            "k": int(k),
            "silhouette": silhouette(features, best),
            "davies_bouldin": davies_bouldin(features, best),
            "stability": float(sum(agreement) / len(agreement)) if agreement else float("nan"),
            # eigenvalues are 0-based: lambda_K is eigenvalues[K - 1]
            "eigengap": float(eigenvalues[k] - eigenvalues[k - 1]),
        })
    return rows


def suggest_k(rows: Sequence[dict[str, Any]], criterion: str = DEFAULT_CRITERION) -> int:
    """The K of ``rows`` (from :func:`cluster_sweep`) that ``criterion`` rates best."""
    if criterion not in CRITERIA:
        raise InvalidInputError(f"unknown criterion {criterion!r}; expected one of {sorted(CRITERIA)}")
    sign = 1.0 if CRITERIA[criterion] else -1.0
    scored = [r for r in rows if math.isfinite(r[criterion])]
    if not scored:
        raise InvalidInputError(f"no K could be scored by {criterion}")
    return int(max(scored, key=lambda r: sign * r[criterion])["k"])


# ---------------------------------------------------------------------------- hpseg clusters


def _feature_extractor(source: str, *, weights: str | None, random_backbone: bool, device: str
                       ) -> tuple[Backbone, torch.nn.Module | None, int, str]:
    """-> (backbone, segmentation head or None, default image size, description) for ``source``:
    a trained model (:func:`hpseg.checkpoints.sources.names_a_source`: HP's segmentation features) or a
    backbone name (raw features)."""
    if names_a_source(source):
        trained = load_trained(source, device, weights)
        return trained.backbone.eval(), trained.model.segmentation.eval(), trained.checkpoint.default_size, \
            f"HP segmentation features of {trained.checkpoint.label} (step {trained.checkpoint.step}, {trained.payload.selection})"
    backbone = create_backbone(source, weights=weights, pretrained=not random_backbone).to(resolve_device(device)).eval()
    kind = "random" if random_backbone else (weights or "official")
    return backbone, None, 224, f"raw features of backbone {source} ({kind} weights)"


@torch.no_grad()
def image_patch_features(source: str, data_root: str, *, split: str = "train", size: int | None = None,
                         max_images: int = 200, weights: str | None = None, random_backbone: bool = False,
                         device: str = "auto", max_patches: int = 2000, seed: int = 0) -> tuple[Tensor, str]:
    """Patch features (N, C) of up to ``max_images`` unlabelled images of a folder dataset, and a
    description of where they come from. Labels, if any, are never read.

    Each image contributes at most 2 * max_patches / n_images random patches (seeded), so that
    hundreds of large images never hold all their patches in memory at once.
    """
    backbone, head, default_size, description = _feature_extractor(source, weights=weights,
                                                                   random_backbone=random_backbone, device=device)
    torch_device = next(backbone.parameters()).device
    raw = build_raw_dataset("folder", data_root, split)
    raw.has_labels = False  # the count of clusters is found without labels: never read them
    view = ValCrops(raw, size=size or default_size)
    n_images = min(len(view), max_images) if max_images else len(view)
    per_image = max(1, math.ceil(2 * max_patches / n_images))
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in progress_bar(range(n_images), logger, desc="features", leave=False):
        features = backbone(view[i]["image"][None].to(torch_device)).features.float()
        if head is not None:
            features = head(features)
        patches = features[0].flatten(1).T.cpu()  # (h * w, C)
        if patches.shape[0] > per_image:
            patches = patches[torch.randperm(patches.shape[0], generator=generator)[:per_image]]
        rows.append(patches)
    return torch.cat(rows), f"{description}; {len(rows)} images of {data_root} ({split}) at {view.size} px"


def plot_sweep(rows: Sequence[dict[str, Any]], suggested: dict[str, int], path: Any, title: str) -> Any:
    """One panel per criterion against K, the suggested K marked; None without matplotlib."""
    try:
        # Lazy: matplotlib is the optional ``hpseg[viz]`` extra (no plot without it) and costs a
        # second to import.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(12, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    ks = [r["k"] for r in rows]
    for i, (criterion, higher) in enumerate(CRITERIA.items()):
        axes = figure.add_subplot(1, len(CRITERIA), i + 1)
        axes.plot(ks, [r[criterion] for r in rows], marker=".")
        axes.axvline(suggested[criterion], color="tab:red", linestyle="--", linewidth=1)
        axes.set_title(f"{criterion} ({'higher' if higher else 'lower'} is better): K={suggested[criterion]}", fontsize=8)
        axes.set_xlabel("K")
        axes.grid(alpha=0.3)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png")
    return path


def run_clusters(source: str, data_root: str, ks: Sequence[int], *, out_dir: str, criterion: str = DEFAULT_CRITERION,
                 max_patches: int = 2000, seed: int = 0, **feature_options: Any) -> dict[str, Any]:
    """``hpseg clusters``: sweep K on the images' patch features; writes clusters.json and clusters.png."""
    folder = OutputFolder(Path(out_dir), "clusters",
                          earlier=lambda path: holds_only(path, ("clusters.json", "clusters.png"), "clusters.json"))
    folder.check()  # before the features are computed
    features, description = image_patch_features(source, data_root, max_patches=max_patches, seed=seed,
                                                 **feature_options)
    rows = cluster_sweep(features, ks, seed=seed, max_patches=max_patches)
    suggested = {name: suggest_k(rows, name) for name in CRITERIA}
    out = folder.claim()
    report = {
        "features": description, "n_patches": int(features.shape[0]), "patches_scored": min(max_patches, features.shape[0]),
        "seed": seed, "k": list(ks), "criterion": criterion, "suggested_k": suggested[criterion],
        "suggested_k_by_criterion": suggested, "rows": rows,
        "reliability": "see docs/results.md 'How many clusters?' for how often each criterion found the true K on known data",
    }
    write_json_atomic(report, out / "clusters.json")
    plot = plot_sweep(rows, suggested, out / "clusters.png", description)
    report["plot"] = str(plot) if plot else None
    return report
