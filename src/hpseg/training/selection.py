"""The label-free criteria of ``train.selection=unsupervised`` (the rules: :mod:`hpseg.checkpoints.runs`).

At every validation step, whatever the rule, the head's segmentation features s (N, D) of the
patches of a fixed sample of *training* crops and the cluster probe's assignment of them (N,)
are scored without any label by:

* ``probe_agreement``: NMI between the cluster probe's clusters and cosine k-means (same K) on
  the same features -- a probe that found the structure the features hold agrees with a fresh
  clustering of them;
* ``stability``: mean ARI between k-means runs of three seeds -- clusters that are really there
  are found again from another start;
* ``silhouette``: the cosine silhouette of the probe's clusters.

Under ``unsupervised`` the checkpoint of the highest ``train.unsupervised_criterion`` is kept.
docs/results.md ("Label-free checkpoint selection") reports how well each tracks the validation mIoU.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from hpseg.evaluation.clusters import adjusted_rand_index, normalized_mutual_information, silhouette
from hpseg.evaluation.kmeans import kmeans
from hpseg.method.model import HiddenPositivesModel
from hpseg.method.probes import centroid_scores

__all__ = ["LABEL_FREE_CRITERIA", "label_free_batches", "label_free_scores", "probe_rows"]

LABEL_FREE_CRITERIA = ("probe_agreement", "stability", "silhouette")


def label_free_scores(features: Tensor, probe_assignment: Tensor, n_clusters: int, *, seed: int = 0,
                      max_patches: int = 2000) -> dict[str, float]:
    """The three label-free criteria of one checkpoint (higher = better for all).

    features (N, D) segmentation features of unlabelled patches, probe_assignment (N,) the
    cluster probe's ids of them. A fixed random sample of ``max_patches`` rows (by ``seed``) is
    scored, so that checkpoints of one run are compared on the same patches.
    """
    if features.shape[0] != probe_assignment.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {probe_assignment.shape[0]} assignments")
    if features.shape[0] > max_patches:
        keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:max_patches]
        features, probe_assignment = features[keep], probe_assignment[keep]
    features, probe_assignment = features.float().cpu(), probe_assignment.long().cpu()
    k = min(n_clusters, features.shape[0])
    runs = [kmeans(features, k, seed=seed + r, cosine=True)[1] for r in range(3)]
    agreement = [adjusted_rand_index(runs[i], runs[j]) for i in range(3) for j in range(i + 1, 3)]
    used = int(probe_assignment.unique().numel())
    return {
        "probe_agreement": normalized_mutual_information(probe_assignment, runs[0]),
        "stability": sum(agreement) / len(agreement),
        # a probe that put every patch into one cluster has no silhouette: the worst value
        "silhouette": silhouette(features, probe_assignment) if used > 1 else -1.0,
    }


@torch.no_grad()
def probe_rows(model: HiddenPositivesModel, feature_maps: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """(B, C, h, w) backbone feature maps -> s as unit rows (N, D) and the cluster probe's ids (N,),
    computed in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    rows, ids = [], []
    for f in feature_maps:
        s = model.segmentation(f.float())
        ids.append(centroid_scores(s, model.cluster_probe.centroids).argmax(1).reshape(-1).cpu())
        rows.append(F.normalize(s.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, s.shape[1]).cpu())
    model.train(was_training)
    return torch.cat(rows), torch.cat(ids)


def label_free_batches(n_crops: int, n_chosen: int, batch_size: int, seed: int) -> list[list[int]]:
    """A fixed random sample of ``n_chosen`` of ``n_crops`` training crops, in batches: the same
    patches for every checkpoint of a run, so that their scores compare."""
    order = torch.randperm(n_crops, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = order[: min(n_chosen, n_crops)]
    return [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]
