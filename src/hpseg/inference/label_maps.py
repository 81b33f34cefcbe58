"""From backbone features to label maps at image resolution (spec §8), shared by
evaluation, training-time validation, ``hpseg predict`` and the Python API.

Both probes are read at full resolution without upsampling the D-channel features: the
linear probe is affine, so upsampling its logits equals applying it to upsampled features,
and a patch's cluster is the argmax of <s, c_k> / ||s||, where the norm does not depend on k,
so the argmax of the upsampled <s, c_k> equals the argmax of the upsampled cosine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hpseg.inference.crf import cluster_probabilities, crf_refine_batch
from hpseg.method.model import HiddenPositivesModel
from hpseg.method.probes import centroid_scores


@dataclass
class LabelMaps:
    """(B, H, W) int64 cluster ids and linear-probe class ids."""

    clusters: torch.Tensor
    classes: torch.Tensor


def _upsample(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def label_maps(
    model: HiddenPositivesModel,
    features: torch.Tensor,
    size: tuple[int, int],
    crf_images: torch.Tensor | None = None,
) -> LabelMaps:
    """Cluster and linear-probe label maps of S's features, upsampled bilinearly to ``size``.

    Args:
        features: (B, C, h, w) backbone features f.
        crf_images: (B, 3, H, W) uint8 images; when given, both maps are refined by the
            dense CRF (cluster probabilities softmax(2 cos), as spec §8).
    """
    segmentation = model.segmentation(features)
    centroids = model.cluster_probe.centroids
    logits = model.linear_probe(segmentation)
    if crf_images is None:
        clusters = _upsample(centroid_scores(segmentation, centroids, cosine=False), size).argmax(1)
        classes = _upsample(logits, size).argmax(1)
    else:
        log_probs = cluster_probabilities(centroid_scores(segmentation, centroids), log=True)
        clusters = crf_refine_batch(crf_images, log_probs).argmax(1)
        classes = crf_refine_batch(crf_images, logits.float()).argmax(1)
    return LabelMaps(clusters, classes)


@torch.no_grad()
def kmeans_label_maps(
    features: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int], crf_images: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) cluster ids of raw features by cosine k-means centroids (the baseline)."""
    if crf_images is None:
        return _upsample(centroid_scores(features, centroids, cosine=False), size).argmax(1)
    log_probs = cluster_probabilities(centroid_scores(features, centroids), log=True)
    return crf_refine_batch(crf_images, log_probs).argmax(1)
