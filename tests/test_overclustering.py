"""Over-clustering (method.extra_clusters): K > n_classes, Hungarian and many-to-one majority matching."""

import numpy as np
import pytest
import torch

from hpseg.config import Config
from hpseg.evaluation.metrics import SegmentationMetrics, hungarian_match, majority_match
from hpseg.evaluation.protocol import evaluate_checkpoint
from hpseg.training.trainer import train
from tests.helpers import tiny_config

# 3 clusters x 2 classes: confusion[p, c] = pixels of cluster p labelled c.
CONFUSION = np.array([[5, 1], [0, 3], [4, 0]])


def metrics_with(confusion: np.ndarray, matching: str) -> SegmentationMetrics:
    """Build the confusion through update(): one pixel per count."""
    pred = np.repeat(np.arange(3), confusion.sum(1))
    label = np.concatenate([np.repeat(np.arange(2), row) for row in confusion])
    metrics = SegmentationMetrics(n_classes=2, n_pred=3, matching=matching)
    metrics.update(torch.from_numpy(pred), torch.from_numpy(label))
    return metrics


def test_majority_matching_by_hand():
    assert majority_match(CONFUSION).tolist() == [0, 1, 0]  # two clusters share class 0
    result = metrics_with(CONFUSION, "majority").compute()
    # matched: class 0 <- clusters 0 and 2 = [9, 1], class 1 <- cluster 1 = [0, 3]
    assert result["confusion"].tolist() == [[9, 1], [0, 3]]
    assert result["accuracy"] == pytest.approx(12 / 13)
    # IoU 0 = 9 / (9 labelled + 10 predicted - 9), IoU 1 = 3 / (4 + 3 - 3)
    assert result["iou"] == pytest.approx([9 / 10, 3 / 4])
    assert result["miou"] == pytest.approx((0.9 + 0.75) / 2)


def test_hungarian_matching_leaves_extra_clusters_wrong():
    assert hungarian_match(CONFUSION).tolist() == [0, 1, -1]  # 5 + 3 beats 4 + 3 and 1 + 4
    result = metrics_with(CONFUSION, "hungarian").compute()
    assert result["unmatched"].tolist() == [4, 0]  # cluster 2's pixels count as wrong
    assert result["accuracy"] == pytest.approx(8 / 13)
    # IoU 0 = 5 / (9 + 6 - 5), IoU 1 = 3 / (4 + 3 - 3)
    assert result["iou"] == pytest.approx([0.5, 0.75])


def test_majority_skips_empty_clusters_and_rejects_unknown_matching():
    assert majority_match(np.array([[0, 0], [2, 7]])).tolist() == [-1, 1]
    with pytest.raises(ValueError, match="matching"):
        SegmentationMetrics(2, matching="greedy")


def test_extra_clusters_config_is_checked():
    assert Config().override(["method.n_classes=4", "method.extra_clusters=3"]).n_clusters == 7
    with pytest.raises(ValueError, match="method.extra_clusters"):
        Config().override(["method.extra_clusters=-1"])


def test_over_clustered_probe_and_baseline_are_scored_both_ways(data_root, tmp_path):
    config = tiny_config(data_root, tmp_path, steps=6, extra=["method.extra_clusters=3", "train.label_free_crops=0"])
    run = train(config, run_dir=tmp_path / "run")
    report = evaluate_checkpoint(run / "checkpoints" / "last.pt", baseline=True, max_images=4)
    assert report["n_clusters"] == 7 and len(report["cluster_to_class"]) == 7
    assert report["matching"] == {"hp": "hungarian", "hp_majority": "majority (many-to-one)",
                                  "baseline": "hungarian", "baseline_majority": "majority (many-to-one)"}
    # Many-to-one matching can only match more pixels than one-to-one on the same confusion.
    assert report["hp_majority"]["unsupervised_accuracy"] >= report["hp"]["unsupervised_accuracy"]
    assert report["baseline_majority"]["unsupervised_accuracy"] >= report["baseline"]["unsupervised_accuracy"]
    assert "K=7" in report["baseline_method"]
    assert len(report["cluster_to_class_majority"]) == 7 and -1 in report["cluster_to_class"]
    # The majority-matched numbers are printed, not only written to results.json.
    hp_text, baseline_text = report["text"].split("Baseline: ", 1)
    for text, title, scores in ((hp_text, "HP over-clustered (K=7)", report["hp_majority"]),
                                (baseline_text, "Baseline over-clustered (K=7)", report["baseline_majority"])):
        section = text.split(title, 1)[1]
        assert "many-to-one majority matching" in section.splitlines()[0]
        for key in ("unsupervised_accuracy", "unsupervised_miou"):
            assert f"  {key.replace('_', ' '):<24} {100 * scores[key]:6.2f}" in section
