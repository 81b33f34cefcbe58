"""The fused Triton kernels of the HP loss (``hpseg.method.loss.triton_kernels``).

They run on CUDA in training; here Triton's interpreter runs them on CPU tensors. The interpreter
is chosen when Triton is imported, so ``test_kernels_under_the_interpreter`` runs this file again
in a subprocess with ``TRITON_INTERPRET=1``; the other tests run only there (and on a CUDA machine
the last one compares the compiled kernels with the torch path).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hpseg.method import IndependentContrastDraw, LossBackend, SharedContrastPattern, hidden_positive_loss
from hpseg.method.loss import dense_loss, triton_kernels
from hpseg.method.positives import PositiveInputs
from tests.helpers import GOLDEN, clustered_batch, full_contrast, golden_id, load_golden

pytestmark = pytest.mark.skipif(not triton_kernels.AVAILABLE, reason="Triton is not installed")
interpreted = pytest.mark.skipif(
    not triton_kernels.INTERPRETED, reason="runs inside test_kernels_under_the_interpreter (TRITON_INTERPRET=1)"
)
# Tests marked ``interpreted`` (parametrised cases counted: one per golden file), checked below.
N_INTERPRETED = 9 + len(GOLDEN)


def test_kernels_under_the_interpreter():
    if triton_kernels.INTERPRETED:
        pytest.skip("already under the interpreter")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not an xdist worker in there
    env.update(TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) == N_INTERPRETED, report


@pytest.mark.skipif(triton_kernels.INTERPRETED, reason="checked by the outer run")
def test_a_cpu_run_does_not_import_triton():
    """Importing Triton costs memory and time a CPU run does not need: the loss imports it on first use."""
    code = (
        "import sys, torch, torch.nn.functional as F\n"
        "import hpseg.cli.main, hpseg.training.trainer\n"
        "from hpseg.method import SharedContrastPattern, hidden_positive_loss\n"
        "z = F.normalize(torch.randn(8, 4), dim=1).requires_grad_()\n"
        "f = torch.randn(8, 4)\n"
        "hidden_positive_loss(z, z, f, f, f[:3], f[:3], patches_per_image=4,\n"
        "    contrast_draw=SharedContrastPattern(torch.rand(4, 8) < 0.5), lmbd=0.2, tau=0.5).backward()\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


class Calls:
    """Counts the calls of the kernels' entry points (to know which path the loss took)."""

    def __init__(self, monkeypatch):
        self.statistics = self.gradients = 0
        row_statistics, gradients = triton_kernels.row_statistics, triton_kernels.symmetric_pair_gradients

        def counted_statistics(*args, **kwargs):
            self.statistics += 1
            return row_statistics(*args, **kwargs)

        def counted_gradients(*args, **kwargs):
            self.gradients += 1
            return gradients(*args, **kwargs)

        monkeypatch.setattr(triton_kernels, "row_statistics", counted_statistics)
        monkeypatch.setattr(triton_kernels, "symmetric_pair_gradients", counted_gradients)


def loss_and_grads(z, z_mix, *args, backend, **kwargs):
    z, z_mix = z.detach().clone().requires_grad_(), z_mix.detach().clone().requires_grad_()
    loss = hidden_positive_loss(z, z_mix, *args, backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), z.grad, z_mix.grad


@interpreted
def test_row_statistics_equal_brute_force():
    """Counts, maxima, sums of exp and weighted sums of logits against the full N x N matrices,
    with N = 27 not a multiple of the 16-patch tiles and one anchor whose contrast set is empty."""
    g = torch.Generator().manual_seed(0)
    hw, n, tau = 9, 27, 0.6
    f, s = torch.randn(n, 5, generator=g), torch.randn(n, 6, generator=g)
    pattern = torch.rand(hw, n, generator=g) < 0.3
    pattern[4] = False  # anchor 4 of image 0 (and 13, 22): contrast = TA only
    f[4] = torch.tensor([1.0, 0, 0, 0, 0])
    pool_ag = torch.cat([torch.randn(4, 5, generator=g), f[4:5]])  # anchor 4's threshold is 1: no TA
    f[[13, 22]] = -f[4]  # no TA through the other's threshold either (similarity -1 to f[4])
    inputs = PositiveInputs.build(f, s, pool_ag, torch.randn(5, 6, generator=g), hw, SharedContrastPattern(pattern))
    z, z_mix = (F.normalize(torch.randn(n, 6, generator=g), dim=1) for _ in range(2))
    pairs = triton_kernels.PairInputs(
        inputs.task_agnostic, inputs.task_specific, inputs.agnostic_thresholds, inputs.specific_thresholds,
        pattern, [z, z_mix], tau,
    )
    counts, stats = triton_kernels.row_statistics(pairs)

    masks = inputs.masks(0, n)
    assert int(masks.contrast[4].sum()) == 0 and 0 < int(masks.task_agnostic.sum()) < n * n // 2
    torch.testing.assert_close(counts[0], masks.task_agnostic.sum(1, dtype=torch.int32))
    torch.testing.assert_close(counts[1], masks.task_specific.sum(1, dtype=torch.int32))
    for k, e in enumerate((z, z_mix)):
        logits = e @ e.T / tau
        in_contrast = logits.masked_fill(~masks.contrast, float("-inf"))
        row_max = in_contrast.amax(1)
        assert row_max[4] == float("-inf") and stats[k, 1, 4] == 0.0
        finite = torch.isfinite(row_max)
        torch.testing.assert_close(stats[k, 0], row_max)
        torch.testing.assert_close(stats[k, 1][finite], (in_contrast - row_max[:, None])[finite].exp().sum(1))
        torch.testing.assert_close(stats[k, 2], (logits * masks.task_agnostic).sum(1))
        torch.testing.assert_close(stats[k, 3], (logits * masks.task_specific).sum(1))


@interpreted
@pytest.mark.parametrize("path", GOLDEN, ids=golden_id)
def test_golden_values_through_the_kernels(path, monkeypatch):
    g = load_golden(path)
    calls = Calls(monkeypatch)
    args = (g["f"], g["s_ema"], g["pool_ag"], g["pool_sp"])
    kwargs = dict(
        patches_per_image=int(g["side"]) ** 2,
        contrast_draw=SharedContrastPattern.from_uniform(g["uniform"], float(g["rho"])),
        lmbd=float(g["lmbd"]), tau=float(g["tau"]), tau_base=float(g["base_tau"]), reweighting=bool(g["reweighting"]),
    )
    loss, gz, gm = loss_and_grads(g["z"], g["z_mix"], *args, backend="triton", **kwargs)
    assert calls.statistics == 1 and calls.gradients >= 1
    assert loss.item() == pytest.approx(g["loss"].item(), rel=1e-3)
    for grad, key in ((gz, "grad_z"), (gm, "grad_z_mix")):
        assert (grad - g[key]).abs().max() <= 1e-3 * g[key].abs().max(), key
    # and the torch path's float32 result to rounding
    torch_loss, tz, tm = loss_and_grads(g["z"], g["z_mix"], *args, backend="torch", **kwargs)
    torch.testing.assert_close(loss, torch_loss, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(gz, tz, rtol=1e-4, atol=1e-5 * tz.abs().max().item())
    torch.testing.assert_close(gm, tm, rtol=1e-4, atol=1e-5 * tm.abs().max().item())


@interpreted
@pytest.mark.parametrize("lmbd,rho,reweighting", [(0.0, 1.0, True), (0.7, 0.3, True), (0.3, 0.5, False)])
def test_kernels_equal_the_dense_loss(lmbd, rho, reweighting, monkeypatch):
    """Without TS (lambda = 0), every patch in the contrast set (rho = 1), no reweighting; the pair
    gradient in two blocks of rows (16 and 11)."""
    torch.manual_seed(0)
    hw, batch = 9, 3
    n = hw * batch
    z, z_mix = F.normalize(torch.randn(n, 6), dim=1), F.normalize(torch.randn(n, 6), dim=1)
    f, s = torch.randn(n, 5), torch.randn(n, 6)
    pool_ag, pool_sp = torch.randn(7, 5), torch.randn(7, 6)
    pattern = torch.rand(hw, n) < rho
    calls = Calls(monkeypatch)
    kwargs = dict(patches_per_image=hw, contrast_draw=SharedContrastPattern(pattern), lmbd=lmbd, tau=0.5,
                  reweighting=reweighting)
    loss, gz, gm = loss_and_grads(
        z, z_mix, f, s, pool_ag, pool_sp, backend=LossBackend("triton", pair_gradient_rows=16), **kwargs
    )
    assert calls.statistics == 1 and calls.gradients == 2
    z2, m2 = z.clone().requires_grad_(), z_mix.clone().requires_grad_()
    expected = dense_loss(z2, m2, f, s, pool_ag, pool_sp, **kwargs)
    ez, em = torch.autograd.grad(expected, (z2, m2))
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gz, ez, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gm, em, rtol=1e-4, atol=1e-5)


@interpreted
def test_half_precision_kernels_match_float32(monkeypatch):
    """float16 products (as under AMP) against the float32 torch path (the interpreter computes bfloat16
    wrongly: that one is checked on CUDA), gradients far below
    float16's range (tau_base = 1e5); the features are clustered away from the thresholds (so no pair
    flips, as near-threshold ones would under the reference's AMP too)."""
    hw = 16
    f, s, z, z_mix, pool_ag, pool_sp, pattern = clustered_batch(hw, 3, 24, 32, rho=0.3)
    kwargs = dict(patches_per_image=hw, contrast_draw=SharedContrastPattern(pattern), lmbd=0.5, tau=0.8, tau_base=1e5)
    calls = Calls(monkeypatch)
    half = loss_and_grads(z, z_mix, f, s, pool_ag, pool_sp, backend="triton",
                          matmul_dtype=torch.float16, **kwargs)
    assert calls.statistics == 1
    full = loss_and_grads(z, z_mix, f, s, pool_ag, pool_sp, backend="torch", **kwargs)
    assert 0 < full[1].abs().max() < 1e-6  # far below float16's smallest normal number
    torch.testing.assert_close(half[0], full[0], rtol=1e-3, atol=0.0)
    for h, f32 in zip(half[1:], full[1:]):
        assert (h - f32).norm() <= 1e-2 * f32.norm()


@interpreted
def test_gradient_of_one_side_only_and_image_without_positives(monkeypatch):
    """z without requires_grad: only z_mix's gradient is made; an image with no positive adds nothing."""
    f = torch.cat([torch.eye(4), torch.randn(4, 4, generator=torch.Generator().manual_seed(1))])
    pool = torch.eye(4)  # every threshold of image 0 (rows 0-3) is 1: none of its anchors is kept
    z = F.normalize(torch.randn(8, 4), dim=1)
    z_mix = F.normalize(torch.randn(8, 4), dim=1)
    kwargs = dict(patches_per_image=4, contrast_draw=full_contrast(4, 8), lmbd=0.0, tau=0.5)
    calls = Calls(monkeypatch)
    b = z_mix.clone().requires_grad_()
    loss = hidden_positive_loss(z, b, f, f, pool, pool, backend="triton", **kwargs)
    loss.backward()
    assert calls.statistics == 1 and calls.gradients >= 1
    expected = loss_and_grads(z, z_mix, f, f, pool, pool, backend="torch", **kwargs)
    torch.testing.assert_close(loss.detach(), expected[0])
    torch.testing.assert_close(b.grad, expected[2])
    assert torch.isfinite(b.grad).all()


@interpreted
def test_independent_draw_takes_the_torch_path(monkeypatch):
    calls = Calls(monkeypatch)
    f = torch.randn(8, 4)
    z = F.normalize(torch.randn(8, 4), dim=1)
    loss = hidden_positive_loss(z, z, f, f, f[:3], f[:3], patches_per_image=4,
                                contrast_draw=IndependentContrastDraw(0.5, seed=0), lmbd=0.2, tau=0.5)
    assert torch.isfinite(loss) and calls.statistics == 0


@interpreted
def test_failing_kernels_warn_and_fall_back_to_the_torch_path(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no GPU compiler here")

    monkeypatch.setattr(triton_kernels, "row_statistics", broken)
    f = torch.randn(8, 4)
    z = F.normalize(torch.randn(8, 4), dim=1)
    kwargs = dict(patches_per_image=4, contrast_draw=full_contrast(4, 8), lmbd=0.2, tau=0.5)
    backend = LossBackend("auto")
    with pytest.warns(UserWarning, match="Triton kernels failed"):
        loss = hidden_positive_loss(z, z, f, f, f[:3], f[:3], backend=backend, **kwargs)
    assert backend.triton_failed and not LossBackend("auto").triton_failed  # the state is the backend's
    calls = Calls(monkeypatch)
    assert loss.item() == hidden_positive_loss(z, z, f, f, f[:3], f[:3], backend=backend, **kwargs).item()
    assert calls.statistics == 0  # from then on the torch path, without trying the kernels again
    assert loss.item() == hidden_positive_loss(z, z, f, f, f[:3], f[:3], backend="torch", **kwargs).item()
    with pytest.raises(RuntimeError, match="no GPU compiler"):  # asked for by name: no fallback
        hidden_positive_loss(z, z, f, f, f[:3], f[:3], backend="triton", **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available() or triton_kernels.INTERPRETED, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_kernels_match_the_torch_path_on_cuda(dtype, monkeypatch):
    """On a GPU, at several tiles' size (N = 4 x 196), the kernels against the torch path's float32."""
    hw = 196
    tensors = clustered_batch(hw, 4, 64, 48, rho=0.05, seed=0)
    f, s, z, z_mix, pool_ag, pool_sp, pattern = (t.cuda() for t in tensors)
    kwargs = dict(patches_per_image=hw, contrast_draw=SharedContrastPattern(pattern), lmbd=0.5, tau=0.8)
    calls = Calls(monkeypatch)
    half = loss_and_grads(z, z_mix, f, s, pool_ag, pool_sp, backend="triton",
                          matmul_dtype=dtype, **kwargs)
    assert calls.statistics == 1
    full = loss_and_grads(z, z_mix, f, s, pool_ag, pool_sp, backend="torch", **kwargs)
    torch.testing.assert_close(half[0], full[0], rtol=2e-3, atol=0.0)
    for h, f32 in zip(half[1:], full[1:]):
        assert (h - f32).norm() <= 1e-2 * f32.norm()


@interpreted
def test_anchor_shares_through_the_kernels_add_up_to_the_whole_loss(monkeypatch):
    """Under torchrun each rank computes its own images' anchors against all N gathered patches
    (``anchor_images``): through the kernels, the ranks' shares of the loss and of both gradients
    add up to the one-process loss of the torch path."""
    torch.manual_seed(0)
    hw, n_images = 9, 4
    n = hw * n_images
    f, s = torch.randn(n, 5), torch.randn(n, 6)
    z, z_mix = F.normalize(torch.randn(n, 6), dim=1), F.normalize(torch.randn(n, 6), dim=1)
    pool_ag, pool_sp = torch.randn(5, 5), torch.randn(5, 6)
    kwargs = dict(patches_per_image=hw, contrast_draw=SharedContrastPattern(torch.rand(hw, n) < 0.4), lmbd=0.4,
                  tau=0.6)
    whole = loss_and_grads(z, z_mix, f, s, pool_ag, pool_sp, backend="torch", **kwargs)
    calls = Calls(monkeypatch)
    backend = LossBackend("triton", pair_gradient_rows=16)
    shares = [loss_and_grads(z, z_mix, f, s, pool_ag, pool_sp, backend=backend, anchor_images=images, **kwargs)
              for images in (range(0, 1), range(1, 3), range(3, 4))]
    assert calls.statistics == 3
    for k in range(3):
        torch.testing.assert_close(sum(share[k] for share in shares), whole[k], rtol=1e-4, atol=1e-6)
