"""The one evaluation loop: a predictor's label maps of every validation batch into an evaluator.

``inference_on_dataset(predictor, batches, evaluator)`` has detectron2's shape: HP
(:class:`hpseg.inference.label_maps.ModelPredictor`) and the k-means baseline
(:class:`~hpseg.inference.label_maps.KMeansPredictor`) plug in as predictors, from backbone
features computed now (:func:`backbone_batches`) or read from the validation feature cache.
With a :class:`hpseg.inference.crf_pool.CRFPool` the label maps are refined by the dense CRF in
its worker processes while this process computes the next batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from hpseg.backbones import Backbone
from hpseg.evaluation.evaluator import EvaluationResults, SegmentationEvaluator
from hpseg.inference.crf_pool import CRFPool
from hpseg.inference.label_maps import Predictor, crf_jobs, stack_label_maps, upsampled_label_maps
from hpseg.logs import progress_counter
from hpseg.runtime import autocast

__all__ = ["FeatureBatch", "backbone_batches", "inference_on_dataset"]

logger = logging.getLogger(__name__)

#: (B, C, h, w) float backbone features, (B, S, S) int64 labels, (B, 3, S, S) uint8 images for the CRF or None.
FeatureBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def backbone_batches(backbone: Backbone, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
                     amp_dtype: torch.dtype | None = None, *, crf: bool = False) -> Iterator[FeatureBatch]:
    """Validation batches of :class:`hpseg.data.ValCrops` (image, label, rgb) -> :data:`FeatureBatch`."""
    for batch in batches:
        with autocast(device, amp_dtype):
            features = backbone(batch["image"].to(device)).features
        yield features.float(), batch["label"].to(device), batch["rgb"] if crf else None


@torch.no_grad()
def inference_on_dataset(predictor: Predictor, batches: Iterable[FeatureBatch], evaluator: SegmentationEvaluator,
                         *, crf_pool: CRFPool | None = None, total_images: int | None = None) -> EvaluationResults:
    """Every batch's label maps (CRF-refined with ``crf_pool``, whose batches then carry their
    images) into ``evaluator``; its results. ``total_images`` sizes the progress bar."""
    evaluator.reset()
    if crf_pool is None:
        with progress_counter(logger, total=total_images, desc="evaluate", unit="image", leave=False) as bar:
            for features, labels, _ in batches:
                evaluator.process(labels, upsampled_label_maps(predictor(features), tuple(labels.shape[-2:])))
                bar.update(labels.shape[0])
    else:
        for labels, refined in crf_pool.map(_crf_jobs(predictor, batches), total=total_images, desc="evaluate (CRF)"):
            evaluator.process(labels[None], stack_label_maps([refined], labels.device))
    return evaluator.evaluate()


def _crf_jobs(predictor: Predictor, batches: Iterable[FeatureBatch]
              ) -> Iterator[tuple[torch.Tensor, tuple[np.ndarray, list[np.ndarray]]]]:
    """(an image's labels, its CRF job) for each image of ``batches``."""
    for features, labels, images in batches:
        if images is None:
            raise ValueError("a CRF evaluation needs the batches' uint8 images (rgb)")
        yield from zip(labels, crf_jobs(predictor(features), tuple(labels.shape[-2:]), images))
