"""Hand-computed cases and properties of the HP method (spec §1-§5)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from hpseg.config import Config, MethodConfig
from hpseg.method import (
    HiddenPositivesModel,
    IndependentContrastDraw,
    SegmentationHead,
    SharedContrastPattern,
    attention_neighbour_weights,
    consistency_loss,
    ema_update_,
    hidden_positive_loss,
    hidden_positive_masks,
    lambda_schedule,
    make_ema_copy,
    neighbourhood_counts,
    propagate_to_neighbours,
)
from hpseg.method.local_positives import row_quantile
from hpseg.method.loss import HiddenPositiveLoss, LossBackend, dense_loss
from hpseg.method.loss.backend import NAMES
from hpseg.method.probes import centroid_scores
from tests.helpers import clustered_batch, full_contrast

# ---------------------------------------------------------------- positives


def test_positives_of_a_two_image_toy_batch():
    # Two images of two patches. Pool row (0.8, 0.6) gives thresholds r = (0.8, 0.6, 0.8, 0.96).
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    pool = torch.tensor([[0.8, 0.6]])
    masks = hidden_positive_masks(f, f, pool, pool, patches_per_image=2, contrast_draw=full_contrast(2, 4))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = True  # similarity 1 beats r = 0.8
    # <f1, f3> = 0.8 beats r_1 = 0.6 but not r_3 = 0.96: the "or" still makes it symmetric.
    expected[1, 3] = expected[3, 1] = True
    assert torch.equal(masks.task_agnostic, expected)
    assert torch.equal(masks.task_specific, expected)
    assert not masks.contrast.diagonal().any()  # self excluded, even with rho = 1
    assert masks.contrast.sum() == 12


def test_contrast_set_is_positives_plus_shared_random_pattern():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    pool = torch.tensor([[0.8, 0.6]])
    pattern = torch.zeros(2, 4, dtype=torch.bool)
    pattern[0, 1] = True  # anchor row 0 of each image samples patch 1
    masks = hidden_positive_masks(f, f, pool, pool, 2, SharedContrastPattern(pattern))
    # anchor 0: positive 2, random 1; anchor 2 (row 0 of image 2): positive 0, random 1.
    assert masks.contrast[0].nonzero().flatten().tolist() == [1, 2]
    assert masks.contrast[2].nonzero().flatten().tolist() == [0, 1]
    assert masks.contrast[1].nonzero().flatten().tolist() == [3]


def test_shared_pattern_from_uniform_threshold():
    uniform = torch.tensor([[0.1, 0.5], [0.3, 0.01]])
    assert SharedContrastPattern.from_uniform(uniform, 0.2).pattern.tolist() == [[True, False], [False, True]]


def test_independent_draw_is_replayable_and_has_rate_rho():
    draw = IndependentContrastDraw(rho=0.25, seed=3)
    a = draw.rows(10, 20, 16, 4000)
    assert torch.equal(a, draw.rows(10, 20, 16, 4000))
    assert not torch.equal(a, draw.rows(20, 30, 16, 4000))
    assert abs(a.float().mean().item() - 0.25) < 0.02


# ---------------------------------------------------------------- lambda, EMA, pools


def test_lambda_schedule_warmup_middle_end():
    assert lambda_schedule(0, 100, 300) == 0.0
    assert lambda_schedule(100, 100, 300) == 0.0  # still warm-up at step == warmup
    assert lambda_schedule(200, 100, 300) == pytest.approx(0.5)
    assert lambda_schedule(300, 100, 300) == 1.0


def test_ema_after_k_steps():
    source = torch.nn.Linear(3, 2)
    ema = make_ema_copy(source)
    start = ema.weight.detach().clone()
    with torch.no_grad():
        source.weight.fill_(2.0)
    m, k = 0.9, 5
    for _ in range(k):
        ema_update_(ema, source, m)
    expected = m**k * start + (1 - m**k) * 2.0
    torch.testing.assert_close(ema.weight, expected)
    assert not ema.weight.requires_grad


# ---------------------------------------------------------------- LHP


def test_neighbourhood_counts_border_and_corner():
    counts = neighbourhood_counts(3, 4).reshape(3, 4)
    assert counts.tolist() == [[4, 6, 6, 4], [6, 9, 9, 6], [4, 6, 6, 4]]


def test_row_quantile_equals_torch_quantile():
    rows = torch.rand(3, 5, 37)
    for q in (0.1, 0.5, 0.9):
        torch.testing.assert_close(row_quantile(rows, q), torch.quantile(rows, q, dim=-1, keepdim=True))


def test_attention_weights_zero_outside_grid_and_below_mean():
    attention = torch.rand(2, 3, 1 + 12, 1 + 12).softmax(-1)
    weights = attention_neighbour_weights(attention, (3, 4))
    assert weights.shape == (2, 12, 9)
    # corner patch 0: only offsets (0,0), (0,1), (1,0), (1,1) -> k = 4, 5, 7, 8 may be non-zero
    assert (weights[:, 0, [0, 1, 2, 3, 6]] == 0).all()
    assert (weights >= 0).all()


def test_lhp_gradient_goes_to_neighbours_in_proportion_to_attention():
    height, width, dim = 4, 5, 3
    s = torch.randn(1, dim, height, width, requires_grad=True)
    weights = torch.rand(1, height * width, 9) + 0.1
    anchor_y, anchor_x = 2, 3
    mixed = propagate_to_neighbours(s, weights)
    mixed[0, :, anchor_y, anchor_x].sum().backward()
    grad = s.grad[0, 0]  # same for every channel
    anchor = anchor_y * width + anchor_x
    expected = torch.zeros(height, width)
    for k, (dy, dx) in enumerate([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]):
        expected[anchor_y + dy, anchor_x + dx] = weights[0, anchor, k] / 9
    torch.testing.assert_close(grad, expected)
    assert (grad[:, :2] == 0).all()  # nothing outside the 3x3 window


def test_lhp_edge_patch_divides_by_six():
    s = torch.ones(1, 1, 3, 3)
    weights = torch.ones(1, 9, 9)
    mixed = propagate_to_neighbours(s, weights)
    # all in-grid weights 1 and s = 1: every patch gets count/count = 1
    torch.testing.assert_close(mixed, torch.ones(1, 1, 3, 3))
    weights[0, 1] = 2.0  # edge patch (0, 1): 6 cells of weight 2 -> 12 / 6
    assert propagate_to_neighbours(s, weights)[0, 0, 0, 1].item() == pytest.approx(2.0)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("backend", ["torch-sparse", "torch-dense"])
@pytest.mark.parametrize("lmbd,rho,reweighting", [(0.0, 1.0, True), (0.7, 0.3, True), (0.3, 0.5, False)])
def test_chunked_loss_equals_dense_loss_and_gradients(lmbd, rho, reweighting, backend):
    """Both tile paths of the torch loss (sparse sampled products, dense products) match its dense definition."""
    torch.manual_seed(0)
    hw, batch = 9, 3
    n = hw * batch
    z = F.normalize(torch.randn(n, 6), dim=1).requires_grad_()
    z_mix = F.normalize(torch.randn(n, 6), dim=1).requires_grad_()
    f, s = torch.randn(n, 5), torch.randn(n, 6)
    pool_ag, pool_sp = torch.randn(7, 5), torch.randn(7, 6)
    pattern = torch.rand(hw, n) < rho
    kwargs = dict(patches_per_image=hw, contrast_draw=SharedContrastPattern(pattern), lmbd=lmbd, tau=0.5,
                  reweighting=reweighting)
    loss = hidden_positive_loss(z, z_mix, f, s, pool_ag, pool_sp, chunk_size=4, backend=backend, **kwargs)
    gz, gm = torch.autograd.grad(loss, (z, z_mix))
    z2, m2 = z.detach().clone().requires_grad_(), z_mix.detach().clone().requires_grad_()
    expected = dense_loss(z2, m2, f, s, pool_ag, pool_sp, **kwargs)
    ez, em = torch.autograd.grad(expected, (z2, m2))
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz, ez, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gm, em, rtol=1e-4, atol=1e-5)


def test_loss_from_config_holds_its_settings_and_backend():
    """A run's loss is built from ``MethodConfig``: its settings and backend reach the value."""
    method = MethodConfig(tau=0.4, tau_base=0.1, temperature_factor=False, reweighting=False, chunk_size=3,
                          loss_backend="torch-sparse")
    loss = HiddenPositiveLoss.from_config(method)
    assert isinstance(loss, torch.nn.Module) and loss.backend.name == "torch-sparse" and loss.chunk_size == 3
    torch.manual_seed(0)
    hw, n = 4, 12
    z, z_mix = F.normalize(torch.randn(n, 5), dim=1), F.normalize(torch.randn(n, 5), dim=1)
    f, s, pool_ag, pool_sp = torch.randn(n, 3), torch.randn(n, 5), torch.randn(4, 3), torch.randn(4, 5)
    draw = SharedContrastPattern(torch.rand(hw, n) < 0.5)
    value = loss(z, z_mix, f, s, pool_ag, pool_sp, patches_per_image=hw, contrast_draw=draw, lmbd=0.3)
    expected = dense_loss(z, z_mix, f, s, pool_ag, pool_sp, patches_per_image=hw, contrast_draw=draw, lmbd=0.3,
                          tau=0.4, tau_base=0.1, temperature_factor=False, reweighting=False)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # The defaults (tau / tau_base scaling, reweighting) give another value: the settings did matter.
    default = HiddenPositiveLoss.from_config(MethodConfig(tau=0.4, tau_base=0.1))
    assert default.backend.name == "auto"
    other = default(z, z_mix, f, s, pool_ag, pool_sp, patches_per_image=hw, contrast_draw=draw, lmbd=0.3)
    assert not torch.isclose(other, value)


def test_each_loss_object_owns_its_backend_state():
    """No process-wide backend: two losses share neither the Triton failure flag nor compiled functions."""
    first, second = HiddenPositiveLoss(0.5), HiddenPositiveLoss(0.5)
    assert first.backend is not second.backend
    assert first.backend.dense_functions is not second.backend.dense_functions
    first.backend.triton_failed = True
    assert not second.backend.triton_failed and not HiddenPositiveLoss(0.5).backend.triton_failed
    benchmark = LossBackend("torch", compile=False)
    assert HiddenPositiveLoss.from_config(MethodConfig(), benchmark).backend is benchmark


def test_config_names_every_loss_backend():
    """``method.loss_backend`` accepts exactly the backends there are; a typo is refused."""
    import typing

    hint = typing.get_type_hints(MethodConfig)["loss_backend"]
    assert set(typing.get_args(hint)) == set(NAMES)
    for name in NAMES:
        assert Config().override([f"method.loss_backend={name}"]).method.loss_backend == name
    with pytest.raises(ValueError, match="loss_backend"):
        Config().override(["method.loss_backend=cuda"])


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown loss backend"):
        LossBackend("cuda")


def test_triton_backend_refuses_inputs_the_kernels_cannot_take():
    """Asked for by name, the kernels never silently give way to the torch path."""
    f = torch.randn(8, 4)
    z = F.normalize(torch.randn(8, 4), dim=1)
    kwargs = dict(patches_per_image=4, lmbd=0.2, tau=0.5, backend="triton")
    with pytest.raises(ValueError, match="independent contrast draw"):
        hidden_positive_loss(z, z, f, f, f[:3], f[:3], contrast_draw=IndependentContrastDraw(0.5, seed=0), **kwargs)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="float16 / bfloat16"):
            hidden_positive_loss(z, z, f, f, f[:3], f[:3], contrast_draw=full_contrast(4, 8), **kwargs)


def test_loss_gradcheck_float64_with_independent_draw():
    torch.manual_seed(1)
    hw, n = 4, 12
    z = F.normalize(torch.randn(n, 3, dtype=torch.float64), dim=1).requires_grad_()
    z_mix = F.normalize(torch.randn(n, 3, dtype=torch.float64), dim=1).requires_grad_()
    f, s = torch.randn(n, 4), torch.randn(n, 3)

    def loss_fn(a, b):
        return hidden_positive_loss(
            a, b, f, s, torch.randn(5, 4, generator=torch.Generator().manual_seed(0)),
            torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), patches_per_image=hw,
            contrast_draw=IndependentContrastDraw(0.5, seed=7), lmbd=0.4, tau=0.6, chunk_size=5,
            matmul_dtype=torch.float64,
        )

    assert torch.autograd.gradcheck(loss_fn, (z, z_mix))


def test_anchor_without_positive_is_skipped_hand_computed():
    # One image of three patches: 0 and 1 are mutual positives, 2 has none.
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    pool = torch.tensor([[0.6, 0.8]])  # thresholds 0.6, 0.6, 0.8: only <f0, f1> = 1 beats them
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    tau = 0.5
    loss = hidden_positive_loss(
        z, z, f, f, pool, pool, patches_per_image=3, contrast_draw=full_contrast(3, 3), lmbd=0.0, tau=tau,
        tau_base=0.07,
    )
    # anchor 0: log p_01 = 0.6/tau - log(e^{0.6/tau} + e^{0/tau}); anchor 1: log p_10 = 0.6/tau - log(e^{0.6/tau} + e^{0.8/tau})
    lp0 = 0.6 / tau - math.log(math.exp(0.6 / tau) + 1.0)
    lp1 = 0.6 / tau - math.log(math.exp(0.6 / tau) + math.exp(0.8 / tau))
    per_image = -(tau / 0.07) * (lp0 + lp1) / 2  # W = 1 each: omega = 1
    assert loss.item() == pytest.approx((2 * per_image) / 2, rel=1e-5)


def test_temperature_factor_option_scales_loss():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(8, 4, generator=g), dim=1)
    f = torch.randn(8, 4, generator=g)
    kwargs = {"patches_per_image": 4, "contrast_draw": full_contrast(4, 8), "lmbd": 0.0, "tau": 0.4}
    faithful = hidden_positive_loss(z, z, f, f, f[:2], f[:2], **kwargs)
    clean = hidden_positive_loss(z, z, f, f, f[:2], f[:2], temperature_factor=False, **kwargs)
    assert faithful.item() == pytest.approx(clean.item() * 0.4 / 0.07, rel=1e-6)


def test_image_without_any_positive_adds_nothing_instead_of_nan():
    f = torch.eye(4)  # orthogonal patches; pool equal to them makes every threshold 1
    z = F.normalize(torch.randn(4, 4), dim=1).requires_grad_()
    loss = hidden_positive_loss(
        z, z, f, f, f, f, patches_per_image=2, contrast_draw=full_contrast(2, 4), lmbd=0.0, tau=0.5
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_consistency_loss_is_plain_distance():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_aug = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert consistency_loss(z, z_aug).item() == pytest.approx(math.sqrt(2) / 2, rel=1e-5)


# ---------------------------------------------------------------- heads


def test_segmentation_head_shapes_and_dropout_only_in_training():
    head = SegmentationHead(8, 5, dropout=0.5)
    f = torch.randn(2, 8, 3, 3)
    head.eval()
    torch.testing.assert_close(head(f), head(f))
    assert head(f).shape == (2, 5, 3, 3)
    head.train()
    torch.manual_seed(0)
    assert not torch.equal(head(f), head(f))


def test_model_probes_predict_shapes():
    model = HiddenPositivesModel(feature_dim=8, dim=6, n_classes=4).eval()
    f = torch.randn(2, 8, 3, 3)
    assert centroid_scores(model(f), model.cluster_probe.centroids).shape == (2, 4, 3, 3)
    assert model.linear_probe(model(f)).shape == (2, 4, 3, 3)
    labels = torch.full((2, 12, 12), -1)
    labels[0, 0, 0] = 2
    loss = model.linear_probe.loss(model(f).detach(), labels)
    assert loss.item() > 0
    assert model.linear_probe.loss(model(f).detach(), torch.full((2, 12, 12), -1)).item() == 0.0



def test_bit_packing_torch_path_matches_numpy():
    """The GPU path of the bit packing (torch operations) gives numpy's bytes and inverts."""
    from hpseg.method.positives import _pack_rows, _pack_rows_torch, _unpack_rows_torch

    mask = torch.rand(5, 21, generator=torch.Generator().manual_seed(0)) < 0.4  # 21: a partial last byte
    packed = _pack_rows_torch(mask)
    assert torch.equal(packed, _pack_rows(mask))
    assert torch.equal(_unpack_rows_torch(packed, 21), mask)


@pytest.mark.parametrize("backend", ["torch", "torch-dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_products_match_float32(dtype, backend):
    """Half-precision products (as under AMP on CUDA) keep loss and gradients close to float32's,
    also when the gradients are far below float16's range (tau_base = 1e5 scales the loss by 1e-5).

    The features are clustered with wide margins around the thresholds, so that half-precision
    similarities do not flip positives (as near-threshold pairs would, like the reference's under AMP).
    """
    hw = 16
    f, s, z, z_mix, pool_ag, pool_sp, pattern = clustered_batch(hw, 3, 24, 32, rho=0.3)
    results = []
    for matmul_dtype in (torch.float32, dtype):
        a, b = z.clone().requires_grad_(), z_mix.clone().requires_grad_()
        loss = hidden_positive_loss(
            a, b, f, s, pool_ag, pool_sp, patches_per_image=hw, contrast_draw=SharedContrastPattern(pattern),
            lmbd=0.5, tau=0.8, tau_base=1e5, matmul_dtype=matmul_dtype, backend=backend,
        )
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    (loss32, gz32, gm32), (loss16, gz16, gm16) = results
    assert 0 < gz32.abs().max() < 1e-6  # far below float16's smallest normal number (6e-5)
    torch.testing.assert_close(loss16, loss32, rtol=1e-3, atol=0.0)
    for half, full in ((gz16, gz32), (gm16, gm32)):
        assert (half - full).norm() <= 1e-2 * full.norm()


def test_gpu_mask_path_yields_the_cpu_paths_masks():
    """The GPU path of ``image_masks`` (each image's masks computed alone) equals the CPU path
    (symmetric halves, bit-packed blocks)."""
    from hpseg.method.positives import PositiveInputs, _image_masks_direct, image_masks

    g = torch.Generator().manual_seed(5)
    hw, batch = 9, 4
    f, s = torch.randn(hw * batch, 6, generator=g), torch.randn(hw * batch, 5, generator=g)
    pattern = torch.rand(hw, hw * batch, generator=g) < 0.3
    # Pools apart from the batch: a pool row equal to a patch would make that pair a tie with the threshold.
    pool_ag, pool_sp = torch.randn(5, 6, generator=g), torch.randn(5, 5, generator=g)
    inputs = PositiveInputs.build(f, s, pool_ag, pool_sp, hw, SharedContrastPattern(pattern))
    assert 0 < int(inputs.masks(0, hw * batch).task_agnostic.sum()) < (hw * batch) ** 2 // 2
    for specific in (True, False):
        direct = list(_image_masks_direct(inputs, task_specific=specific))
        assert len(direct) == batch
        for image, masks in enumerate(image_masks(inputs, task_specific=specific, chunk_size=4)):
            assert torch.equal(masks.task_agnostic, direct[image].task_agnostic)
            assert torch.equal(masks.contrast, direct[image].contrast)
            assert (masks.task_specific is None) == (not specific)
            if specific:
                assert torch.equal(masks.task_specific, direct[image].task_specific)
