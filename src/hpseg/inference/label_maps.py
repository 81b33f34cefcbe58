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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from hpseg.inference.crf import cluster_probabilities, crf_probabilities
from hpseg.inference.crf_numpy import refine_labels
from hpseg.method.model import HiddenPositivesModel
from hpseg.method.probes import centroid_scores


@dataclass
class LabelMaps:
    """(B, H, W) int64 cluster ids and linear-probe class ids (None: no linear probe)."""

    clusters: torch.Tensor
    classes: torch.Tensor | None


@dataclass
class HeadInputs:
    """What both heads read for one batch, from a predictor.

    Attributes:
        cluster_features: (B, D, h, w) the features the centroids score (HP's s, the baseline's raw f).
        centroids: (K, D) cluster centroids.
        linear_logits: (B, C, h, w) linear-probe logits, None without a linear probe.
    """

    cluster_features: torch.Tensor
    centroids: torch.Tensor
    linear_logits: torch.Tensor | None


class Predictor(Protocol):
    """Backbone features -> :class:`HeadInputs` (HP's heads, or the k-means baseline's)."""

    n_clusters: int

    def __call__(self, features: torch.Tensor) -> HeadInputs: ...


class ModelPredictor:
    """HP: the segmentation head S, its cluster probe and its linear probe."""

    def __init__(self, model: HiddenPositivesModel) -> None:
        self.model = model
        self.n_clusters = int(model.cluster_probe.n_clusters)

    def __call__(self, features: torch.Tensor) -> HeadInputs:
        segmentation = self.model.segmentation(features)
        return HeadInputs(segmentation, self.model.cluster_probe.centroids, self.model.linear_probe(segmentation))


class KMeansPredictor:
    """The "DINO baseline": cosine k-means centroids and a linear probe (or None) on raw features f."""

    def __init__(self, centroids: torch.Tensor, probe: torch.nn.Module | None) -> None:
        self.centroids, self.probe = centroids, probe
        self.n_clusters = int(centroids.shape[0])

    def __call__(self, features: torch.Tensor) -> HeadInputs:
        logits = None if self.probe is None else self.probe(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return HeadInputs(features, self.centroids, logits)


def _upsample(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)


def cluster_crf_log_probs(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) features already at the label size, (K, D) centroids -> (B, K, H, W) cluster
    log-probabilities ``log_softmax(2 · cos)``, the CRF's cluster unaries."""
    return cluster_probabilities(centroid_scores(features, centroids), log=True)


def cluster_crf_unaries(features: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, D, h, w) features, (K, D) centroids -> (B, K, H, W) cluster log-probabilities for the CRF:
    features upsampled bilinearly to ``size`` first, then ``log_softmax(2 · cos)`` (the reference's
    order). One image at a time: a (D, H, W) upsampled map is the large intermediate."""
    return torch.cat([cluster_crf_log_probs(_upsample(one[None], size), centroids) for one in features])


def upsampled_label_maps(inputs: HeadInputs, size: tuple[int, int]) -> LabelMaps:
    """Label maps at ``size`` without the CRF: scores upsampled bilinearly, then argmax."""
    clusters = _upsample(centroid_scores(inputs.cluster_features, inputs.centroids, cosine=False), size).argmax(1)
    classes = None if inputs.linear_logits is None else _upsample(inputs.linear_logits, size).argmax(1)
    return LabelMaps(clusters, classes)


def crf_jobs(inputs: HeadInputs, size: tuple[int, int],
             crf_images: torch.Tensor) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """The CRF's input, image by image: ``((H, W, 3) uint8 image, [(K, H, W) cluster probabilities,
    (C, H, W) linear probabilities if there is a probe])`` for :func:`hpseg.inference.crf_pool.refine_labels`.

    Cluster unaries as the reference takes them (:func:`cluster_crf_unaries`); linear ones the
    logits upsampled (exact, the probe being affine); both softmaxed at ``size``."""
    heads = [crf_probabilities(cluster_crf_unaries(inputs.cluster_features, inputs.centroids, size), size)]
    if inputs.linear_logits is not None:
        heads.append(crf_probabilities(inputs.linear_logits, size))
    images = crf_images.detach().permute(0, 2, 3, 1).cpu().numpy()
    for i, image in enumerate(images):
        yield image, [probs[i] for probs in heads]


def stack_label_maps(per_image: list[list[np.ndarray]], device: torch.device) -> LabelMaps:
    """Refined maps of :func:`refine_labels`, image by image, -> one batch's :class:`LabelMaps`."""
    heads = [torch.from_numpy(np.stack(maps)).to(device) for maps in zip(*per_image)]
    return LabelMaps(heads[0], heads[1] if len(heads) > 1 else None)


@torch.no_grad()
def predict_label_maps(predictor: Predictor, features: torch.Tensor, size: tuple[int, int],
                       crf_images: torch.Tensor | None = None) -> LabelMaps:
    """One batch's label maps at ``size``, refined by the dense CRF in this process when
    ``crf_images`` ((B, 3, H, W) uint8) are given."""
    inputs = predictor(features)
    if crf_images is None:
        return upsampled_label_maps(inputs, size)
    refined = [refine_labels(image, probs) for image, probs in crf_jobs(inputs, size, crf_images)]
    return stack_label_maps(refined, features.device)


def label_maps(model: HiddenPositivesModel, features: torch.Tensor, size: tuple[int, int],
               crf_images: torch.Tensor | None = None) -> LabelMaps:
    """Cluster and linear-probe label maps of S's features, upsampled bilinearly to ``size``.

    Args:
        features: (B, C, h, w) backbone features f.
        crf_images: (B, 3, H, W) uint8 images; when given, both maps are refined by the
            dense CRF (cluster probabilities softmax(2 cos) of the upsampled s, as the reference
            and spec §8).
    """
    return predict_label_maps(ModelPredictor(model), features, size, crf_images)


def kmeans_label_maps(features: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int],
                      crf_images: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) cluster ids of raw features by cosine k-means centroids (the baseline)."""
    return predict_label_maps(KMeansPredictor(centroids, None), features, size, crf_images).clusters
