"""The HP method (spec §1-§5) as pure functions and small modules.

- ``heads``: segmentation head S, projection head P;  ``ema``: the EMA head S'
- ``probes``: cluster and linear probes;  ``model``: all trainable parts in one module
- ``pools``: threshold pools;  ``positives``: global hidden positives and contrast sets
- ``local_positives``: attention processing and 3x3 propagation (LHP)
- ``loss``: the GHP + LHP loss (``HiddenPositiveLoss``) by backend (torch path: CPU, sparse, dense;
  Triton kernels on CUDA), its dense definition, and the consistency loss
- ``schedule``: the lambda schedule
"""

from hpseg.method.ema import ema_update_, make_ema_copy
from hpseg.method.heads import ProjectionHead, SegmentationHead, to_rows
from hpseg.method.local_positives import (
    NEIGHBOUR_OFFSETS,
    attention_neighbour_weights,
    neighbourhood_counts,
    propagate_to_neighbours,
)
from hpseg.method.loss import HiddenPositiveLoss, LossBackend, consistency_loss, hidden_positive_loss
from hpseg.method.model import HiddenPositivesModel
from hpseg.method.pools import fill_pool, picked_patches
from hpseg.method.positives import (
    ContrastDraw,
    IndependentContrastDraw,
    PositiveMasks,
    SharedContrastPattern,
    hidden_positive_masks,
    pool_thresholds,
)
from hpseg.method.probes import ClusterProbe, LinearProbe
from hpseg.method.schedule import lambda_schedule

__all__ = [
    "NEIGHBOUR_OFFSETS",
    "ClusterProbe",
    "ContrastDraw",
    "HiddenPositiveLoss",
    "HiddenPositivesModel",
    "IndependentContrastDraw",
    "LinearProbe",
    "LossBackend",
    "PositiveMasks",
    "ProjectionHead",
    "SegmentationHead",
    "SharedContrastPattern",
    "attention_neighbour_weights",
    "consistency_loss",
    "fill_pool",
    "ema_update_",
    "hidden_positive_loss",
    "hidden_positive_masks",
    "lambda_schedule",
    "make_ema_copy",
    "neighbourhood_counts",
    "picked_patches",
    "pool_thresholds",
    "propagate_to_neighbours",
    "to_rows",
]
