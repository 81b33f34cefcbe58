"""Probe scores to label maps: the one centroid_scores function, by hand, and its two uses."""

from __future__ import annotations

import torch

from hpseg.inference.label_maps import label_maps
from hpseg.method.model import HiddenPositivesModel
from hpseg.method.probes import centroid_scores


def test_centroid_scores_by_hand() -> None:
    # Two patches f = (3, 4) and (0, -2); centroids (1, 0) and (0, 2) -> unit (1, 0), (0, 1).
    features = torch.tensor([[3.0, 0.0], [4.0, -2.0]]).view(1, 2, 1, 2)
    centroids = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    raw = centroid_scores(features, centroids, cosine=False)
    cosine = centroid_scores(features, centroids)
    torch.testing.assert_close(raw.view(2, 2), torch.tensor([[3.0, 0.0], [4.0, -2.0]]))
    torch.testing.assert_close(cosine.view(2, 2), torch.tensor([[0.6, 0.0], [0.8, -1.0]]))
    assert torch.equal(raw.argmax(1), cosine.argmax(1))  # same cluster per patch
    assert centroid_scores(features.half(), centroids.half()).dtype == torch.float32


def test_the_cluster_probe_trains_on_the_cosine_label_maps_read() -> None:
    torch.manual_seed(0)
    model = HiddenPositivesModel(feature_dim=6, dim=4, n_classes=3).eval()
    features = torch.randn(2, 6, 3, 3)
    segmentation = model(features)
    cosine = centroid_scores(segmentation, model.cluster_probe.centroids)
    # The probe's loss: minus the mean cosine to the winning centroid.
    torch.testing.assert_close(model.cluster_probe.loss(segmentation), -cosine.max(1).values.mean())
    # At patch resolution (no upsampling) the label map is the cosine argmax.
    assert torch.equal(label_maps(model, features, (3, 3)).clusters, cosine.argmax(1))
