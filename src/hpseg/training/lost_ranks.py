"""When a rank of a ``torchrun`` job dies: the others stop with a message that says how to go on.

A rank that dies (killed, out of memory, its machine gone) leaves the others in a collective.
They learn it in one of three ways: the collective fails at once (gloo: "connection closed by
peer"), it fails after ``$HPSEG_COLLECTIVE_TIMEOUT`` seconds (``runtime.collective_timeout``: a
rank that hangs, a machine off the network), or ``torchrun`` stops them with SIGTERM (what it does
to the other workers of its machine as soon as one fails). In each case the rank raises
:class:`RankLostError`, naming the step and the run's last checkpoint, which rank 0 wrote
atomically before and which ``hpseg train --resume RUN`` continues from. Under NCCL a timed-out
collective may abort the process from NCCL's watchdog before Python sees it; torchrun's own
summary then names the failed rank, and the resume command is in the log from the run's start.
"""

from __future__ import annotations

import re
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch.distributed as dist

from hpseg.checkpoints.store import CheckpointError, read_torch_file
from hpseg.errors import HpsegError
from hpseg.runtime import DistributedContext


class RankLostError(HpsegError, RuntimeError):
    """This rank can go on no longer: another rank of the job failed, hangs, or torchrun stopped the job."""


class _Stopped(BaseException):
    """Raised by the SIGTERM handler of :func:`explain_lost_ranks` (not an ``Exception``: no
    ``except Exception`` on the way may take it for an error of its own)."""


def resume_hint(run_dir: Path) -> str:
    """Where the run's last checkpoint is and the command that continues it."""
    last = run_dir / "checkpoints" / "last.pt"
    try:
        where = f"the last checkpoint is {last} (step {int(read_torch_file(last)['step'])})"
    except (CheckpointError, KeyError, TypeError, ValueError):
        where = f"{last} is not there (rank 0 writes it on its machine, every train.checkpoint_interval steps)"
    return f"{where}: resume with `hpseg train --resume {run_dir}` under the same torchrun command"


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` came out of a ``torch.distributed`` call (a peer gone, a timeout), not this rank's own work."""
    if isinstance(error, dist.DistError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/torch/distributed/" in frames[-1].filename.replace("\\", "/")


def _reason(error: BaseException) -> str:
    """The first sentence of a backend error without its source location ("[.../pair.cc:561] ")."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()) or type(error).__name__
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0][:200]


@contextmanager
def explain_lost_ranks(context: DistributedContext, run_dir: Path, steps_done: Callable[[], int]) -> Iterator[None]:
    """Turn a failed collective, or torchrun's SIGTERM, inside the block into a :class:`RankLostError`
    naming this rank, ``steps_done()`` and the resume command (nothing changes on one process)."""
    if not context.enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the message be written
        raise _Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    who = f"rank {context.rank} of {context.world_size}"
    try:
        yield
    except _Stopped:
        raise RankLostError(f"{who} was stopped (SIGTERM) after step {steps_done()}: torchrun stops the other ranks "
                            f"when one fails (its summary names which); {resume_hint(run_dir)}") from None
    except RuntimeError as error:
        if isinstance(error, RankLostError) or not is_collective_failure(error):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise RankLostError(f"{who} lost its peers after step {steps_done()} ({_reason(error)}); "
                            f"{resume_hint(run_dir)}") from error
    finally:
        signal.signal(signal.SIGTERM, previous)
