"""Tests of the synthetic dataset generator (hpseg.data.make_synthetic_dataset)."""

from __future__ import annotations

import numpy as np

from hpseg.data import build_raw_dataset, make_synthetic_dataset


def _bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_train=64, n_val=16, size=64, n_classes=4, seed=0)
    b = make_synthetic_dataset(tmp_path / "b", n_train=64, n_val=16, size=64, n_classes=4, seed=0)
    ba, bb = _bytes(a), _bytes(b)
    assert ba == bb and len(ba) == 2 * (64 + 16) + 1
    c = make_synthetic_dataset(tmp_path / "c", n_train=64, n_val=16, size=64, n_classes=4, seed=1)
    assert _bytes(c) != ba
    # rewriting with fewer images removes the surplus files of the earlier run
    make_synthetic_dataset(tmp_path / "c", n_train=8, n_val=2, size=64, n_classes=4, seed=1)
    assert len(list((tmp_path / "c/train/images").iterdir())) == 8


def test_synthetic_labels_classes_and_colours(tmp_path):
    k = 5
    root = make_synthetic_dataset(tmp_path, n_train=12, n_val=6, size=48, n_classes=k, seed=3)
    means = []
    for split, n in (("train", 12), ("val", 6)):
        ds = build_raw_dataset("folder", root, split)
        assert len(ds) == n and ds.has_labels and ds.n_classes == k and len(ds.class_names) == k
        pix = [[] for _ in range(k)]
        for i in range(n):
            s = ds[i]
            assert s.image.size == (48, 48) and s.label.shape == (48, 48)
            assert s.label.min() >= 0 and s.label.max() < k  # exact labels, no ignore
            img = np.asarray(s.image).reshape(-1, 3).astype(float)
            for c in range(k):
                pix[c].append(img[s.label.reshape(-1) == c])
        pix = [np.concatenate(p) for p in pix]
        assert all(len(p) > 0 for p in pix), f"a class is missing from {split}"
        means.append(np.array([p.mean(0) for p in pix]))
    m = means[0]
    dists = np.linalg.norm(m[:, None] - m[None], axis=-1)[np.triu_indices(k, 1)]
    assert dists.min() > 20  # classes differ in mean colour (0..255 units)
    np.testing.assert_allclose(means[0], means[1], atol=25)  # same class look in both splits


def test_synthetic_larger_size(tmp_path):
    root = make_synthetic_dataset(tmp_path, n_train=2, n_val=1, size=128, n_classes=3, seed=0)
    s = build_raw_dataset("folder", root, "train")[0]
    assert s.image.size == (128, 128)
