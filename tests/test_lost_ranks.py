"""A rank of a torchrun job that dies or hangs: the others stop with the resume command, the last
checkpoint stays as it was, and ``--resume`` finishes the run (``hpseg.training.lost_ranks``)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hpseg.checkpoints.payload import load_checkpoint
from hpseg.runtime import COLLECTIVE_TIMEOUT_ENV, DistributedContext, collective_timeout
from hpseg.training.lost_ranks import RankLostError, explain_lost_ranks
from tests.helpers import free_port, read_jsonl, synthetic_prepared, tiny_overrides

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_resume_finishes_it(tmp_path):
    """Rank 1 is SIGKILLed before step 4 (last.pt holds step 2): the job exits non-zero within
    the collective timeout, rank 0 names the step, the checkpoint and the command; last.pt is
    byte for byte what it was; ``--resume`` under torchrun trains steps 3..6, each logged once."""
    data = synthetic_prepared(tmp_path)
    run, record = tmp_path / "run", tmp_path / "last.sha256"
    overrides = [*tiny_overrides(data, tmp_path / "runs", steps=6), "train.device=cpu", "train.checkpoint_interval=2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **{COLLECTIVE_TIMEOUT_ENV: "30"})
    dying = [*TORCHRUN, str(Path(__file__).with_name("dying_rank.py")), "3", str(record)]
    started = time.monotonic()
    result = subprocess.run([*dying, "train", "--preset", "cocostuff27", "--run-dir", str(run), "--no-progress",
                             *overrides], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 60  # torchrun or the failed collective ended it, not a 30 s timeout chain
    message = re.search(r"rank 0 of 2 (lost its peers|was stopped \(SIGTERM\)) after step 3\b.*", result.stderr)
    assert message, result.stderr[-3000:]
    assert (f"the last checkpoint is {run}/checkpoints/last.pt (step 2): resume with `hpseg train --resume {run}`"
            in message.group(0))
    assert hashlib.sha256((run / "checkpoints" / "last.pt").read_bytes()).hexdigest() == record.read_text()
    assert load_checkpoint(run / "checkpoints" / "last.pt").step == 2

    resumed = subprocess.run([*TORCHRUN, "-m", "hpseg", "train", "--resume", str(run), "--no-progress"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == list(range(1, 7))
    assert load_checkpoint(run / "checkpoints" / "last.pt").step == 6


def _silent_peer(rank: int, port: int, out: str) -> None:
    """Rank 0 waits in an all-reduce that rank 1, alive but busy, never joins."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      **{COLLECTIVE_TIMEOUT_ENV: "2"})
    from hpseg.runtime import init_distributed

    context = init_distributed(torch.device("cpu"))
    if rank == 1:
        time.sleep(120)  # a hung rank: the parent ends it
    started = time.monotonic()
    try:
        with explain_lost_ranks(context, Path(out) / "run", lambda: 5):
            torch.distributed.all_reduce(torch.ones(3))
    except RankLostError as error:
        Path(out, "message").write_text(f"{time.monotonic() - started:.1f} {error}")


@pytest.mark.slow
def test_a_hung_rank_fails_the_others_after_the_collective_timeout(tmp_path):
    job = mp.start_processes(_silent_peer, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork",
                             join=False)
    job.processes[0].join(60)
    for process in job.processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
    waited, message = (tmp_path / "message").read_text().split(" ", 1)
    assert 1.5 <= float(waited) < 15
    assert message.startswith("rank 0 of 2 lost its peers after step 5 (Timed out waiting 2000ms")
    assert f"{tmp_path / 'run'}/checkpoints/last.pt is not there" in message


def test_sigterm_inside_the_job_says_how_to_resume(tmp_path):
    """torchrun's SIGTERM to the surviving ranks becomes the error with the resume command; the
    previous handler is back afterwards; on one process nothing is caught."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RankLostError, match=r"rank 1 of 4 was stopped \(SIGTERM\) after step 7: .*--resume"):
        with explain_lost_ranks(DistributedContext(1, 4), tmp_path, lambda: 7):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(RuntimeError, match="not a collective"):
        with explain_lost_ranks(DistributedContext(0, 2), tmp_path, lambda: 7):
            raise RuntimeError("not a collective")  # this rank's own error keeps its message


def test_collective_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert collective_timeout().total_seconds() == 600
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "2.5")
    assert collective_timeout().total_seconds() == 2.5
    for bad in ("0", "-3", "ten"):
        monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"{COLLECTIVE_TIMEOUT_ENV}='{bad}': expected a positive, finite number"):
            collective_timeout()
