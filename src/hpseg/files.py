"""Atomic file writes: every output and checkpoint of hpseg goes through :func:`atomic_write`.

A file is written to a hidden temporary beside its destination (``.<name>.<random>.tmp``),
flushed to disk and renamed over the destination, so a reader never sees a half-written file
and a crash, a kill or a full disk leaves the previous version (or nothing) in place. The
temporary is created with mode 0o666 filtered by the umask, like any other file the user
writes, so colleagues sharing a folder can read the outputs (``mkstemp``'s 0o600 would survive
the rename).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "is_temporary", "read_jsonl", "remove_stale_temporaries", "write_json_atomic",
           "write_text_atomic"]


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """A handle (``mode`` "wb" or "w") whose content replaces ``path`` only if the block succeeds.

    Creates missing parent folders. On any exception the temporary file is removed and the
    exception propagates (an ``OSError`` that names no file, e.g. a full disk, is raised again
    naming ``path``); ``path`` is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, destination)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.filename is not None or error.errno is None:
            raise
        # A full disk fails in write/flush/fsync, whose errors name no file: name the destination.
        raise type(error)(error.errno, error.strerror, str(destination)) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(payload: Any, path: str | os.PathLike[str], indent: int = 2) -> Path:
    """Write ``payload`` as JSON to ``path`` atomically; returns the path."""
    return write_text_atomic(json.dumps(payload, indent=indent), path)


def read_jsonl(path: str | os.PathLike[str]) -> tuple[list[tuple[int, str, dict[str, Any]]], list[int]]:
    """The records of a JSON-lines file as (line number, line, record), and the numbers of the
    lines that are not JSON objects (a record cut short by a crash or a full disk); blank lines
    are skipped."""
    records, torn = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append((number, line, record))
        else:
            torn.append(number)
    return records, torn


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporaries (hidden, ``.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete temporaries left in ``directory`` by a killed writer; returns how many."""
    removed = 0
    for name in os.listdir(directory):
        if is_temporary(name):
            Path(directory, name).unlink(missing_ok=True)
            removed += 1
    return removed
