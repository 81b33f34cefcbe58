"""Tests of hpseg.evaluation.metrics against hand-computed confusion matrices and scores."""

from __future__ import annotations

import math
import multiprocessing

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from hpseg.evaluation.metrics import (
    SegmentationMetrics,
    apply_assignment,
    confusion_matrix,
    hungarian_match,
    segmentation_scores,
)

# A 3-class example small enough to count by hand (last pixel ignored).
LABEL = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
PRED = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 2, 1])
# rows = prediction, columns = label:
#   pred 0: label 0 at pixels 0,1; label 2 at pixel 7    -> [2, 0, 1]
#   pred 1: label 0 at pixel 2;   label 1 at pixels 3,4  -> [1, 2, 0]
#   pred 2: label 2 at pixels 5,6,8                      -> [0, 0, 3]
HAND_CONFUSION = [[2, 0, 1], [1, 2, 0], [0, 0, 3]]
# accuracy = (2 + 2 + 3) / 9 valid pixels
HAND_ACCURACY = 7 / 9
# IoU = TP / (labelled + predicted - TP):
#   class 0: 2 / (3 + 3 - 2) = 1/2; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 3 / (4 + 3 - 3) = 3/4
HAND_IOU = [1 / 2, 2 / 3, 3 / 4]
HAND_MIOU = (1 / 2 + 2 / 3 + 3 / 4) / 3  # = 23/36


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(PRED, LABEL, n_pred=3, n_classes=3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == HAND_CONFUSION


def test_scores_by_hand_linear():
    m = SegmentationMetrics(3, matching="identity")
    m.update(PRED.view(2, 5), LABEL.view(2, 5))
    r = m.compute()
    assert r["accuracy"] == pytest.approx(HAND_ACCURACY)
    assert r["miou"] == pytest.approx(HAND_MIOU) == pytest.approx(23 / 36)
    assert r["iou"] == pytest.approx(HAND_IOU)
    assert r["n_pixels"] == 9
    assert r["confusion"].tolist() == HAND_CONFUSION
    assert r["assignment"].tolist() == [0, 1, 2]


def test_scores_function_by_hand():
    r = segmentation_scores(np.array(HAND_CONFUSION))
    assert r["accuracy"] == pytest.approx(HAND_ACCURACY)
    assert r["miou"] == pytest.approx(HAND_MIOU)


def test_permuted_clusters_hand_example():
    perm = torch.tensor([2, 0, 1])  # cluster id of each class
    m = SegmentationMetrics(3)
    m.update(perm[PRED], LABEL)
    r = m.compute()
    assert r["assignment"].tolist() == [1, 2, 0]  # inverse permutation
    assert r["confusion"].tolist() == HAND_CONFUSION
    assert r["accuracy"] == pytest.approx(HAND_ACCURACY)
    assert r["miou"] == pytest.approx(HAND_MIOU)


def test_permuted_perfect_prediction():
    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.integers(0, 5, size=(2, 8, 8)))
    perm = torch.tensor([3, 0, 4, 1, 2])  # a derangement: no cluster id equals its class
    m = SegmentationMetrics(5)
    m.update(perm[label], label)
    r = m.compute()
    assert r["accuracy"] == 1.0 and r["miou"] == 1.0
    assert apply_assignment(perm[label], r["assignment"]).equal(label)
    # without matching the same prediction is poor
    lin = SegmentationMetrics(5, matching="identity")
    lin.update(perm[label], label)
    assert lin.compute()["accuracy"] == 0.0


def test_ignore_labels_excluded():
    # -1 and anything >= n_classes (3, 255) are ignored, whatever the prediction there.
    label = torch.tensor([0, 1, 2, -1, 3, 255])
    pred = torch.tensor([0, 1, 2, 0, 1, 2])
    conf = confusion_matrix(pred, label, 3, 3)
    assert conf.sum() == 3 and conf.tolist() == np.eye(3, dtype=int).tolist()
    # uint8 labels with 255 = ignore work too
    conf8 = confusion_matrix(pred, torch.tensor([0, 1, 2, 255, 255, 255], dtype=torch.uint8), 3, 3)
    assert conf8.tolist() == conf.tolist()
    m = SegmentationMetrics(3)
    m.update(pred, label)
    assert m.compute()["accuracy"] == 1.0


def test_unseen_class_left_out_of_miou():
    m = SegmentationMetrics(4, matching="identity")  # class 3 is never labelled nor predicted
    m.update(PRED, LABEL)
    r = m.compute()
    assert r["iou"][3] is None
    assert r["miou"] == pytest.approx(HAND_MIOU)
    # a class predicted but never labelled has IoU 0 and does count
    m.update(torch.tensor([3]), torch.tensor([0]))
    r = m.compute()
    assert r["iou"][3] == 0.0
    assert len([v for v in r["iou"] if v is not None]) == 4


def test_more_clusters_than_classes():
    label = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    pred = torch.tensor([3, 3, 0, 0, 4, 1, 1])
    conf = confusion_matrix(pred, label, 5, 3)
    assert conf.tolist() == [[0, 2, 0], [0, 0, 2], [0, 0, 0], [2, 0, 0], [0, 1, 0]]
    assert hungarian_match(conf).tolist() == [1, 2, -1, 0, -1]
    m = SegmentationMetrics(3, n_pred=5)
    m.update(pred, label)
    r = m.compute()
    # cluster 4's pixel is unmatched: wrong, and a false negative of class 1
    assert r["unmatched"].tolist() == [0, 1, 0]
    assert r["accuracy"] == pytest.approx(6 / 7)
    assert r["iou"] == pytest.approx([1.0, 2 / 3, 1.0])
    assert r["miou"] == pytest.approx(8 / 9)
    assert r["confusion"].shape == (3, 3) and r["n_pixels"] == 7
    assert apply_assignment(pred, r["assignment"]).tolist() == [0, 0, 1, 1, -1, 2, 2]


def test_fewer_clusters_than_classes():
    label = torch.tensor([0, 0, 1, 2, 2])
    pred = torch.tensor([1, 1, 0, 0, 0])
    m = SegmentationMetrics(3, n_pred=2)
    m.update(pred, label)
    r = m.compute()
    assert r["assignment"].tolist() == [2, 0]
    assert r["accuracy"] == pytest.approx(4 / 5)
    assert r["iou"] == pytest.approx([1.0, 0.0, 2 / 3])


def test_accumulation_equals_one_update():
    rng = np.random.default_rng(1)
    labels = [torch.from_numpy(rng.integers(-1, 6, size=(3, 7, 9))) for _ in range(4)]
    preds = [torch.from_numpy(rng.integers(0, 8, size=(3, 7, 9))) for _ in range(4)]
    many = SegmentationMetrics(6, n_pred=8)
    for p, lab in zip(preds, labels):
        many.update(p, lab)
    one = SegmentationMetrics(6, n_pred=8)
    one.update(torch.cat(preds), torch.cat(labels))
    assert many.confusion.equal(one.confusion)
    a, b = many.compute(), one.compute()
    assert a["accuracy"] == b["accuracy"] and a["miou"] == b["miou"]
    # state round trip and reset
    other = SegmentationMetrics(6, n_pred=8)
    other.load_state_dict(many.state_dict())
    assert other.compute()["miou"] == a["miou"]
    many.reset()
    assert many.compute()["n_pixels"] == 0 and math.isnan(many.compute()["accuracy"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="predictions must lie"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3, 3)
    # out-of-range predictions on ignored pixels are harmless
    assert confusion_matrix(torch.tensor([0, 7]), torch.tensor([0, -1]), 3, 3).sum() == 1
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(torch.rand(4), torch.zeros(4, dtype=torch.long), 3, 3)
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long), 3, 3)


def test_all_reduce_is_noop_without_distributed():
    m = SegmentationMetrics(3)
    m.update(PRED, LABEL)
    before = m.confusion.clone()
    m.all_reduce_()
    assert m.confusion.equal(before)


def _ddp_worker(rank: int, store: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        m = SegmentationMetrics(3, matching="identity")
        half = slice(0, 5) if rank == 0 else slice(5, 10)
        m.update(PRED[half], LABEL[half])
        m.all_reduce_()
        queue.put((rank, m.confusion.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_all_reduce_sums_over_two_ranks(tmp_path, monkeypatch):
    # fork keeps this fast (no re-import of torch); the workers use gloo over loopback only.
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_ddp_worker, args=(r, store, queue)) for r in range(2)]
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == HAND_CONFUSION


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_confusion_matches_cpu():
    rng = np.random.default_rng(2)
    label = torch.from_numpy(rng.integers(-1, 27, size=(2, 64, 64)))
    pred = torch.from_numpy(rng.integers(0, 27, size=(2, 64, 64)))
    m = SegmentationMetrics(27)
    m.update(pred.cuda(), label.cuda())
    assert m.confusion.device.type == "cuda"
    assert m.confusion.cpu().equal(confusion_matrix(pred, label, 27, 27))
    assert m.compute()["n_pixels"] == int(((label >= 0) & (label < 27)).sum())


@settings(max_examples=40, deadline=None)
@given(
    n_classes=st.integers(1, 12),
    n_pixels=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_property_random_permutation_scores_perfect(n_classes, n_pixels, seed, data):
    rng = np.random.default_rng(seed)
    label = rng.integers(-1, n_classes, size=n_pixels)
    label[0] = rng.integers(0, n_classes)  # at least one valid pixel
    perm = np.array(data.draw(st.permutations(range(n_classes))))
    pred = np.where(label >= 0, perm[np.clip(label, 0, None)], rng.integers(0, n_classes, size=n_pixels))
    m = SegmentationMetrics(n_classes)
    m.update(torch.from_numpy(pred), torch.from_numpy(label))
    r = m.compute()
    assert r["accuracy"] == 1.0
    assert r["miou"] == 1.0
    present = set(label[label >= 0].tolist())
    assert [c for c, v in enumerate(r["iou"]) if v is not None] == sorted(present)
