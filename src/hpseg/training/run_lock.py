"""One writer per run folder: ``hpseg train`` (new or ``--resume``) holds ``<run>/.hpseg-train.lock``.

The lock file holds the writer's host, process id and start time. A second ``hpseg train`` on
the same folder is refused with a message naming the folder and the holder. A lock left by a
killed process is stale -- its host is this machine and no process has its id any more -- and
is taken over with a notice; a lock held on another host cannot be checked from here, so the
message says to delete the file once that run is known to be gone. The lock is released when
the run ends, fails or is interrupted. Under torchrun only the first rank takes it. The holder
removes the temporary files a writer killed mid-save left in ``checkpoints/``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hpseg.errors import HpsegError
from hpseg.files import remove_stale_temporaries

__all__ = ["LOCK_NAME", "RunLockedError", "run_lock"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".hpseg-train.lock"


class RunLockedError(HpsegError, RuntimeError):
    """Another process is writing the run folder."""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock's content; None when it is unreadable or torn (a writer killed while writing it)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _is_stale(holder: dict[str, Any] | None) -> bool:
    if holder is None:
        return True
    return holder.get("host") == socket.gethostname() and not _process_exists(holder["pid"])


def _create(path: Path, mine: dict[str, Any]) -> bool:
    """Create the lock file holding ``mine``; False when it exists."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as stream:
        stream.write(json.dumps(mine))
    return True


def _acquire(run_dir: Path, path: Path, mine: dict[str, Any]) -> None:
    if _create(path, mine):
        return
    holder = _holder(path)
    if not _is_stale(holder):
        assert holder is not None
        where = "this machine" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
        raise RunLockedError(
            f"{run_dir} is being written by another hpseg train (process {holder['pid']} on {where}, since "
            f"{holder.get('started', '?')}): wait for it to finish, or train into another --run-dir; if that "
            f"run is gone, delete {path}")
    logger.warning("%s: taking over the lock left by %s", run_dir,
                f"process {holder['pid']}, which is no longer running" if holder else "an interrupted run")
    path.unlink(missing_ok=True)
    if not _create(path, mine) or _holder(path) != mine:  # another process took it over first
        raise RunLockedError(f"{run_dir} is being written by another hpseg train that started just now")


def _remove_leftovers(run_dir: Path) -> None:
    """The temporaries of a writer killed while saving a checkpoint (only the lock's holder may)."""
    checkpoints = run_dir / "checkpoints"
    removed = remove_stale_temporaries(checkpoints) if checkpoints.is_dir() else 0
    if removed:
        logger.info("%s: removed %d temporary file(s) left by an interrupted run", checkpoints, removed)


@contextmanager
def run_lock(run_dir: str | Path, *, holder: bool = True) -> Iterator[None]:
    """Hold the run folder's lock for the block (created with the folder if need be).

    ``holder``: whether this process takes the lock; under torchrun the first rank holds it for the
    job and the others pass False (``DistributedContext.is_main``).
    """
    if not holder:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    _acquire(run_dir, path, mine)
    _remove_leftovers(run_dir)
    try:
        yield
    finally:
        if _holder(path) == mine:
            path.unlink(missing_ok=True)
