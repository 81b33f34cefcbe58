"""Checkpoint selection rules (``train.selection``) and the label-free criteria of ``unsupervised``.

* ``best``: the reference's rule -- the highest sum of the four validation metrics, which uses
  the labels of the validation split the numbers are then reported on **[ref quirk]**;
* ``last``: the final weights; no label decides anything;
* ``unsupervised``: the checkpoint whose segmentation features score highest on a label-free
  criterion (``train.unsupervised_criterion``), computed on a fixed sample of *training* crops
  at every validation step, without their labels.

The criteria, on the head's features s (N, D) of the sampled patches and the cluster probe's
assignment of them (N,):

* ``probe_agreement``: NMI between the cluster probe's clusters and cosine k-means (same K) on
  the same features -- a probe that found the structure the features hold agrees with a fresh
  clustering of them;
* ``stability``: mean ARI between k-means runs of three seeds -- clusters that are really there
  are found again from another start;
* ``silhouette``: the cosine silhouette of the probe's clusters.

README ("Label-free checkpoint selection") reports how well each tracks the validation mIoU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hpseg.clusters import adjusted_rand_index, normalized_mutual_information, silhouette
from hpseg.kmeans import kmeans

__all__ = ["LABEL_FREE_CRITERIA", "RULES", "checkpoint_file", "label_free_scores", "probe_rows", "resolve_checkpoint",
           "selection_text"]

#: selection rule -> checkpoint kind written by training (checkpoints/<kind>.pt).
RULES = {"best": "best", "last": "last", "unsupervised": "unsupervised"}
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
def probe_rows(model: Any, feature_maps: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(B, C, h, w) backbone feature maps -> s as rows (N, D) and the probe's ids (N,), eval mode."""
    was_training = model.training
    model.eval()
    rows, ids = [], []
    for f in feature_maps:
        s = model.segmentation(f.float())
        ids.append(model.cluster_probe.predict(s).reshape(-1).cpu())
        rows.append(F.normalize(s.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, s.shape[1]).cpu())
    model.train(was_training)
    return torch.cat(rows), torch.cat(ids)


def selection_text(rule: str, criterion: str = "") -> str:
    """How a checkpoint of ``rule`` was chosen, as written into checkpoints and results."""
    if rule == "best":
        return "best sum of unsupervised and linear accuracy and mIoU on the validation set"
    if rule == "unsupervised":
        return f"highest label-free {criterion} on a fixed sample of training crops (no labels used)"
    return "last step"


def checkpoint_file(run_dir: str | Path, rule: str) -> Path:
    """The checkpoint a run's selection ``rule`` designates: ``<run>/checkpoints/<kind>.pt``."""
    if rule not in RULES:
        raise ValueError(f"train.selection={rule!r}: expected one of {sorted(RULES)}")
    return Path(run_dir) / "checkpoints" / f"{RULES[rule]}.pt"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as it is; a run folder -> the checkpoint its ``train.selection`` chose.

    So that ``hpseg eval RUN`` and ``hpseg predict --checkpoint RUN`` use, by default, what the
    run's own rule picked -- with ``last`` or ``unsupervised``, never a label-chosen one.
    """
    import yaml

    path = Path(path)
    if not path.is_dir():
        return path
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is a folder but not a run folder (no config.yaml): pass a checkpoint file")
    rule = ((yaml.safe_load(config_file.read_text()) or {}).get("train") or {}).get("selection", "best")
    chosen = checkpoint_file(path, rule)
    if not chosen.is_file():
        raise FileNotFoundError(f"{chosen} does not exist: the run's rule train.selection={rule} wrote no checkpoint "
                                "yet (did training finish?)")
    return chosen
