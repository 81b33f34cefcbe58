"""Tests of hpseg.inference.crf: missing-extra error, probability helpers, and (when installed) refinement."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from hpseg.inference import crf
from hpseg.inference.crf import (
    CRFUnavailableError,
    cluster_probabilities,
    crf_available,
    crf_refine_batch,
    dense_crf,
    images_to_uint8,
)


@pytest.fixture
def no_pydensecrf(monkeypatch):
    """Make ``import pydensecrf...`` fail as if the extra were not installed."""
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)


def _two_regions(h: int = 40, w: int = 48, noise: float = 0.35, seed: int = 0):
    """Left half dark, right half bright; probabilities right on average but noisy per pixel."""
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, : w // 2] = (30, 40, 50)
    image[:, w // 2 :] = (220, 210, 200)
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, w // 2 :] = 1
    p1 = np.where(truth == 1, 0.65, 0.35) + rng.uniform(-noise, noise, size=(h, w))
    p1 = np.clip(p1, 0.02, 0.98)
    probs = np.stack([1.0 - p1, p1]).astype(np.float32)
    return image, probs, truth


def test_missing_pydensecrf_raises_with_install_hint(no_pydensecrf):
    assert not crf_available()
    image, probs, _ = _two_regions()
    with pytest.raises(CRFUnavailableError, match=r'pip install "hpseg\[crf\]"') as info:
        dense_crf(image, probs)
    message = str(info.value)
    assert "pydensecrf2" in message and "1.0rc3" in message
    assert isinstance(info.value, ImportError)
    with pytest.raises(CRFUnavailableError):
        crf_refine_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 2, 4, 4))


def test_cluster_probabilities_is_softmax_of_twice_cosine():
    cos = torch.rand(2, 5, 3, 4) * 2 - 1
    p = cluster_probabilities(cos)
    assert torch.allclose(p, torch.softmax(2 * cos, dim=1))
    assert torch.allclose(p.sum(1), torch.ones(2, 3, 4))
    assert torch.allclose(cluster_probabilities(cos, log=True).exp(), p, atol=1e-6)


def test_images_to_uint8_inverts_imagenet_normalisation():
    img = torch.randint(0, 256, (2, 3, 5, 6), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    normalised = (img.float() / 255 - mean) / std
    assert torch.equal(images_to_uint8(normalised), img)


def test_spec_parameters():
    assert crf.N_ITER == 10
    assert (crf.GAUSSIAN_SXY, crf.GAUSSIAN_COMPAT) == (1, 3)
    assert (crf.BILATERAL_SXY, crf.BILATERAL_SRGB, crf.BILATERAL_COMPAT) == (67, 3, 4)


def test_dense_crf_sharpens_two_regions():
    pytest.importorskip("pydensecrf.densecrf")
    image, probs, truth = _two_regions()
    before = (probs.argmax(0) == truth).mean()
    assert before < 0.9  # the noise really does flip pixels
    refined = dense_crf(image, probs)
    assert refined.shape == probs.shape and refined.dtype == np.float32
    assert np.allclose(refined.sum(0), 1.0, atol=1e-4)
    assert (refined.argmax(0) == truth).mean() == 1.0
    # more confident than the input on average
    assert refined.max(0).mean() > probs.max(0).mean()


def test_crf_refine_batch_upsamples_and_matches_single():
    pytest.importorskip("pydensecrf.densecrf")
    image, probs, truth = _two_regions(h=32, w=32)
    images = torch.from_numpy(np.stack([image, image[:, ::-1].copy()])).permute(0, 3, 1, 2)
    # low-resolution logits: log of 8x8 average-pooled probabilities
    low = torch.nn.functional.avg_pool2d(torch.from_numpy(probs)[None], 4).log()
    logits = torch.cat([low, low.flip(-1)])
    out = crf_refine_batch(images, logits)
    assert out.shape == (2, 2, 32, 32) and out.dtype == torch.float32
    assert out.device == logits.device
    assert (out[0].argmax(0).numpy() == truth).mean() == 1.0
    assert (out[1].argmax(0).numpy() == truth[:, ::-1]).mean() == 1.0
    # probabilities input path gives the same result as logits of the same distribution
    out_p = crf_refine_batch(images, torch.softmax(logits, 1), from_logits=False)
    up = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    single = dense_crf(image, torch.softmax(up, 1)[0].numpy())
    assert np.allclose(out[0].numpy(), single, atol=1e-5)
    assert out_p.shape == out.shape


def test_crf_refine_batch_rejects_float_images():
    with pytest.raises(ValueError, match="images_to_uint8"):
        crf_refine_batch(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 8, 8))


# ------------------------------------------------------------------ the reference's CRF unaries


def _reference_cluster_unaries(segmentation: torch.Tensor, centroids: torch.Tensor, size) -> torch.Tensor:
    """The reference's evaluation order, written out: s upsampled to the label size, then the
    cosine to each centroid, then log_softmax(2 · cos)."""
    up = torch.nn.functional.interpolate(segmentation, size=size, mode="bilinear", align_corners=False)
    cos = torch.einsum("bdhw,kd->bkhw", torch.nn.functional.normalize(up, dim=1),
                       torch.nn.functional.normalize(centroids, dim=1))
    return torch.log_softmax(2 * cos, dim=1)


def _model_and_features(seed: int = 0):
    from hpseg.method.model import HiddenPositivesModel

    torch.manual_seed(seed)
    model = HiddenPositivesModel(feature_dim=16, dim=8, n_classes=3).eval().requires_grad_(False)
    features = torch.randn(2, 16, 4, 4)
    return model, features


def test_cluster_crf_unaries_upsample_the_features_first():
    from hpseg.inference.label_maps import cluster_crf_unaries
    from hpseg.method.probes import centroid_scores

    model, features = _model_and_features()
    segmentation = model.segmentation(features)
    centroids = model.cluster_probe.centroids
    size = (32, 32)
    ours = cluster_crf_unaries(segmentation, centroids, size)
    torch.testing.assert_close(ours, _reference_cluster_unaries(segmentation, centroids, size), rtol=1e-5, atol=1e-6)
    # The former order (cosine at patch resolution, log-probabilities upsampled) is not the same.
    former = torch.nn.functional.interpolate(cluster_probabilities(centroid_scores(segmentation, centroids), log=True),
                                             size=size, mode="bilinear", align_corners=False)
    assert (former - ours).abs().max() > 1e-3


@pytest.mark.parametrize("baseline", [False, True], ids=["hp", "kmeans"])
def test_crf_label_maps_are_the_references(baseline: bool):
    """Evaluation with CRF, end to end: hpseg's cluster maps (HP's probe, and the k-means
    baseline on raw features) equal CRF(softmax(reference unaries)).argmax; linear maps too."""
    pytest.importorskip("pydensecrf.densecrf")
    from hpseg.inference.label_maps import kmeans_label_maps, label_maps

    model, features = _model_and_features(1)
    size = (32, 32)
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    rgb = images.permute(0, 2, 3, 1).numpy()

    def reference_crf(log_probs: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(log_probs.detach(), 1).numpy()
        return torch.from_numpy(np.stack([dense_crf(rgb[i], probs[i]) for i in range(len(probs))])).argmax(1)

    if baseline:
        centroids = torch.randn(3, 16)
        ours = kmeans_label_maps(features, centroids, size, images)
        assert torch.equal(ours, reference_crf(_reference_cluster_unaries(features, centroids, size)))
        return
    maps = label_maps(model, features, size, images)
    segmentation = model.segmentation(features)
    expected = reference_crf(_reference_cluster_unaries(segmentation, model.cluster_probe.centroids, size))
    assert torch.equal(maps.clusters, expected)
    up = torch.nn.functional.interpolate(segmentation, size=size, mode="bilinear", align_corners=False)
    assert torch.equal(maps.classes, reference_crf(torch.log_softmax(model.linear_probe(up), 1)))
