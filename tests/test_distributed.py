"""Training on several processes (gloo on the CPU) equals training in one (``hpseg.training.distributed``).

The processes are started with ``torch.multiprocessing`` and join through ``env://`` as under
``torchrun``. Channel dropout draws differ per rank by design, so the exactness runs turn it off
(``method.dropout=0``, no similarity dropout); everything else is the training loop as it runs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from hpseg.method import SharedContrastPattern, hidden_positive_loss
from hpseg.runtime import DistributedContext
from hpseg.training.distributed import check_batch_split, rank_share, share_bounds
from tests.helpers import free_port, synthetic_prepared, tiny_config

pytestmark = pytest.mark.slow

EXACT = ["train.batch_size=6", "method.dropout=0", "method.similarity_dropout=false", "method.renew_interval=2",
         "train.val_interval=100", "train.validate_at_epoch_end=false"]


def _rank_main(rank: int, world_size: int, port: int, data: str, out: str, extra: list[str]) -> None:
    """One rank of a job: the environment torchrun would set, then the trainer."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from pathlib import Path

    from hpseg.training.trainer import Trainer

    config = tiny_config(Path(data), Path(out) / "runs", steps=3, extra=["train.device=cpu", *extra])
    run = Path(out) / "run"
    run.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, run)
    trainer.fit()
    torch.save(trainer.model.state_dict(), Path(out) / f"weights{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_job(world_size: int, data, out, extra=()) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Per-step HP losses (rank 0's log) and every rank's final weights."""
    args = (world_size, free_port(), str(data), str(out), list(extra))
    mp.start_processes(_rank_main, args=args, nprocs=world_size, start_method="spawn", join=True)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["hp"] for r in records if "hp" in r]
    weights = [torch.load(out / f"weights{rank}.pt", weights_only=True) for rank in range(world_size)]
    return losses, weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_prepared(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    return run_job(1, data, tmp_path_factory.mktemp("w1"), EXACT)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_train_the_single_process_model(data, single, tmp_path, world_size):
    """The same global batch of 6 crops for 3 steps (a pool renewal among them) on 2 and 3 ranks:
    the per-step HP loss within 1e-5 and the heads within 1e-4 of one process, every rank alike."""
    losses, weights = run_job(world_size, data, tmp_path, EXACT)
    one_losses, (one,) = single
    assert len(losses) == 3
    for loss, expected in zip(losses, one_losses):
        assert abs(loss - expected) <= 1e-5 * abs(expected), (losses, one_losses)
    for name in ("segmentation", "projection", "ema_segmentation"):
        keys = [k for k in one if k.startswith(name + ".")]
        assert keys
        for key in keys:
            assert relative(weights[0][key], one[key]) <= 1e-4, key
    for other in weights[1:]:
        for key, value in weights[0].items():
            assert torch.equal(other[key], value), key


def test_rank_local_positives_differ_from_the_method(data, single, tmp_path):
    """``train.positives=local`` finds positives within each rank's 3 crops: another loss than the
    6-crop batch's (what the option costs in faithfulness), still one model on both ranks."""
    losses, weights = run_job(2, data, tmp_path, [*EXACT, "train.positives=local"])
    assert all(abs(a - b) > 1e-4 * abs(b) for a, b in zip(losses, single[0]))
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key


def test_ranks_start_from_one_model_with_dropout_on(data, tmp_path):
    """With channel dropout (different masks per rank) the ranks still hold the same weights."""
    _, weights = run_job(2, data, tmp_path, ["train.batch_size=6"])
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key


def test_global_batch_must_divide_over_ranks():
    with pytest.raises(ValueError, match=r"train.batch_size=6 is the global batch .* 4 ranks"):
        check_batch_split(6, DistributedContext(rank=0, world_size=4))
    assert check_batch_split(8, DistributedContext(rank=1, world_size=4)) == 2


def test_rank_shares_partition_a_batch_in_order():
    batch = list(range(10, 17))
    shares = [rank_share(batch, DistributedContext(rank, 3)) for rank in range(3)]
    assert shares == [[10, 11, 12], [13, 14], [15, 16]]
    assert [share_bounds(2, r, 3) for r in range(3)] == [slice(0, 1), slice(1, 2), slice(2, 2)]


@pytest.mark.parametrize("backend", ["torch", "torch-sparse"])
def test_anchor_shares_add_up_to_the_whole_loss(backend):
    """Each rank's share (its images' anchors against all N patches) sums to the batch's loss and gradients."""
    torch.manual_seed(0)
    hw, n_images = 16, 6
    n = hw * n_images
    f, s = torch.randn(n, 8), torch.randn(n, 6)
    z, z_mix = (torch.nn.functional.normalize(torch.randn(n, 6), dim=1) for _ in range(2))
    draw = SharedContrastPattern(torch.rand(hw, n) < 0.3)

    def share(images):
        a, b = z.clone().requires_grad_(), z_mix.clone().requires_grad_()
        loss = hidden_positive_loss(a, b, f, s, f[:5], s[:5], patches_per_image=hw, contrast_draw=draw, lmbd=0.3,
                                    tau=0.2, backend=backend, anchor_images=images)
        loss.backward()
        return loss.detach(), a.grad, b.grad

    whole = share(None)
    for parts in ([range(0, 3), range(3, 6)], [range(0, 2), range(2, 4), range(4, 6)], [range(0, 1), range(1, 6)]):
        shares = [share(images) for images in parts]
        for k in range(3):
            total = sum(s[k] for s in shares)
            torch.testing.assert_close(total, whole[k], rtol=1e-5, atol=1e-7)
        assert float(shares[0][0]) != pytest.approx(float(whole[0]))  # a share is not the whole
    with pytest.raises(ValueError, match="anchor images"):
        share(range(4, 7))


def test_cache_runs_on_the_first_rank_only(monkeypatch, tmp_path):
    """Under torchrun the other ranks of ``hpseg cache`` leave the work to rank 0."""
    from hpseg.cli.main import main

    monkeypatch.setenv("RANK", "1")
    assert main(["--quiet", "cache", "--preset", "cocostuff27", "--data-root", str(tmp_path / "absent"),
                 "--out", str(tmp_path / "cache")]) == 0
    assert not (tmp_path / "cache").exists()


def test_eval_under_torchrun_equals_one_process(data, tmp_path):
    """``hpseg eval --baseline`` on 2 ranks (3 validation images: 2 on rank 0, 1 on rank 1) writes
    the results.json one process writes, and prints them once."""
    import subprocess
    import sys

    from hpseg.cli.main import main
    from hpseg.training.trainer import train

    run = train(tiny_config(data, tmp_path / "runs", steps=2, extra=["train.device=cpu", "train.val_interval=100"]),
                run_dir=tmp_path / "run")
    evaluate = ["eval", str(run / "checkpoints" / "last.pt"), "--device", "cpu", "--max-images", "3", "--baseline"]
    assert main(["--quiet", *evaluate, "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "hpseg",
                             *evaluate, "--out", str(tmp_path / "two")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("results written to") == 1
    for rank, share in ((0, 2), (1, 1)):
        assert f"rank {rank} of 2 evaluates {share} of the 3 validation images" in result.stderr
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert one["n_images"] == 3 and "baseline" in one
    assert two == one
