"""The one evaluation loop: any predictor plugs in, the evaluator's typed results, the bar's total."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from hpseg.evaluation.evaluator import METRIC_KEYS, SegmentationEvaluator
from hpseg.evaluation.loop import inference_on_dataset
from hpseg.evaluation.protocol import evaluate_model, selection_score
from hpseg.inference.label_maps import HeadInputs, KMeansPredictor


class OneHotPredictor:
    """Patch features are one-hot scores already: cluster k = argmax, linear logits = the same."""

    n_clusters = 3

    def __call__(self, features: torch.Tensor) -> HeadInputs:
        return HeadInputs(features, torch.eye(3), features)


def test_a_predictor_plugs_into_the_loop_and_the_scores_are_hand_computed():
    # One 1x4 image: predicted ids 0, 1, 2, 2; labels 1, 1, 2, -1 (ignored).
    features = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 2]]), 3).permute(0, 2, 1)[..., None, :].float()
    labels = torch.tensor([[[1, 1, 2, -1]]])
    evaluator = SegmentationEvaluator(n_classes=3, n_clusters=3)
    results = inference_on_dataset(OneHotPredictor(), [(features, labels, None)], evaluator, total_images=1)
    # Linear (identity): pixels 1 and 2 right, pixel 0 (class 0 predicted, label 1) wrong -> 2/3.
    assert results.linear is not None and abs(results.linear.accuracy - 2 / 3) < 1e-12
    assert results.linear.confusion == [[0, 1, 0], [0, 1, 0], [0, 0, 1]]
    # Hungarian: clusters 0 and 1 both see class 1; one of them gets it -> 2 of 3 matched.
    assert abs(results.unsupervised.accuracy - 2 / 3) < 1e-12 and results.n_pixels == 3
    assert results.cluster_to_class[2] == 2 and results.majority is None
    flat = results.to_dict()
    assert set(METRIC_KEYS) <= set(flat) and flat["linear_confusion"] == results.linear.confusion
    assert flat["matching"] == "hungarian" and flat["n_clusters"] == 3
    assert selection_score(results) == sum(results.metrics().values())


def test_the_kmeans_predictor_without_a_probe_scores_the_clusters_only():
    features = torch.randn(2, 4, 2, 2)
    labels = torch.randint(0, 2, (2, 4, 4))
    evaluator = SegmentationEvaluator(n_classes=2, n_clusters=3, linear=False)
    results = inference_on_dataset(KMeansPredictor(torch.randn(3, 4), None), [(features, labels, None)], evaluator)
    assert results.linear is None and set(results.metrics()) == {"unsupervised_accuracy", "unsupervised_miou"}
    assert results.majority is not None  # 3 clusters for 2 classes: also matched many-to-one
    assert "linear_miou" not in results.to_dict() and "unsupervised_majority_miou" in results.to_dict()


def test_the_evaluation_bar_counts_images_out_of_a_total(capsys):
    from hpseg.backbones import create_backbone
    from hpseg.method.model import HiddenPositivesModel

    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_p8", pretrained=False).eval()
    model = HiddenPositivesModel(feature_dim=backbone.embed_dim, dim=8, n_classes=3)
    items = [{"image": torch.randn(3, 16, 16), "rgb": torch.zeros(3, 16, 16, dtype=torch.uint8),
              "label": torch.zeros(16, 16, dtype=torch.long)} for _ in range(5)]
    logger = logging.getLogger("hpseg")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        evaluate_model(model, backbone, DataLoader(items, batch_size=2), 3, torch.device("cpu"))
    finally:
        logger.setLevel(level)
    err = capsys.readouterr().err
    assert "0/5 [" in err and "0it" not in err  # a total (the bar, leave=False, is cleared at the end)
