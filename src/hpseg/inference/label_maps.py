"""From backbone features to label maps at image resolution (spec §8), shared by
evaluation, training-time validation, ``hpseg predict`` and the Python API.

Without the CRF both probes are read at full resolution without upsampling the D-channel
features: the linear probe is affine, so upsampling its logits equals applying it to upsampled
features, and a pixel's cluster is the argmax of <s, c_k> / ||s||, where the norm does not
depend on k, so the argmax of the upsampled <s, c_k> equals the argmax of the upsampled cosine.

With the CRF the *values* matter, and the normalisation inside the cosine does not commute with
upsampling: the cluster unaries are taken as the reference takes them, features upsampled to
the label size first, then ``log_softmax(2 · cos(s, c_k))`` there (:func:`cluster_crf_unaries`).
The linear unaries stay upsampled logits (exact, the probe being affine).
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


def cluster_crf_unaries(features: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, D, h, w) features, (K, D) centroids -> (B, K, H, W) cluster log-probabilities for the CRF:
    features upsampled bilinearly to ``size`` first, then ``log_softmax(2 · cos)`` (the reference's
    order). One image at a time: a (D, H, W) upsampled map is the large intermediate."""
    return torch.cat([cluster_probabilities(centroid_scores(_upsample(one[None], size), centroids), log=True)
                      for one in features])


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
            dense CRF (cluster probabilities softmax(2 cos) of the upsampled s, as the reference
            and spec §8).
    """
    segmentation = model.segmentation(features)
    centroids = model.cluster_probe.centroids
    logits = model.linear_probe(segmentation)
    if crf_images is None:
        clusters = _upsample(centroid_scores(segmentation, centroids, cosine=False), size).argmax(1)
        classes = _upsample(logits, size).argmax(1)
    else:
        clusters = crf_refine_batch(crf_images, cluster_crf_unaries(segmentation, centroids, size)).argmax(1)
        classes = crf_refine_batch(crf_images, logits.float()).argmax(1)
    return LabelMaps(clusters, classes)


@torch.no_grad()
def kmeans_label_maps(
    features: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int], crf_images: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) cluster ids of raw features by cosine k-means centroids (the baseline)."""
    if crf_images is None:
        return _upsample(centroid_scores(features, centroids, cosine=False), size).argmax(1)
    return crf_refine_batch(crf_images, cluster_crf_unaries(features, centroids, size)).argmax(1)
