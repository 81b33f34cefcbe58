"""Atomic file writes: every output and checkpoint of hpseg goes through :func:`atomic_write`.

A file is written to a hidden temporary beside its destination (``.<name>.<random>.tmp``),
flushed to disk and renamed over the destination, so a reader never sees a half-written file
and a crash, a kill or a full disk leaves the previous version (or nothing) in place. The
temporary is created with mode 0o666 filtered by the umask, like any other file the user
writes, so colleagues sharing a folder can read the outputs (``mkstemp``'s 0o600 would survive
the rename).

Output folders follow one rule (:class:`OutputFolder`, docs/outputs.md): a command writes into a
new or empty folder or its own earlier output, marked by :data:`OUTPUT_MARKER`; anything else is
refused naming the folder, before the work.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hpseg.errors import HpsegError

__all__ = ["OUTPUT_MARKER", "OutputFolder", "OutputFolderError", "atomic_write", "claim_output_folder", "holds_only",
           "is_temporary", "read_jsonl", "remove_stale_temporaries", "write_json_atomic", "write_text_atomic"]


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


# ---------------------------------------------------------------------------------------- output folders

#: The file marking a folder as the output of one hpseg command (hidden: a hub folder pushed as it
#: is leaves it out, and it does not clutter the user's listing).
OUTPUT_MARKER = ".hpseg-output.json"


class OutputFolderError(HpsegError, ValueError):
    """An output folder hpseg may not write into (it holds files hpseg did not write)."""


def _written_by(folder: Path) -> str | None:
    """The command named by ``folder``'s marker; None without one. A marker that is not hpseg's
    JSON counts as none (so the folder is refused, never overwritten)."""
    try:
        written_by = json.loads((folder / OUTPUT_MARKER).read_text()).get("written_by")
    except (OSError, ValueError, AttributeError):
        return None
    return written_by if isinstance(written_by, str) else None


def holds_only(folder: Path, names: Iterable[str], required: str) -> bool:
    """Whether ``folder`` holds ``required`` and nothing but entries named in ``names`` (temporaries
    aside): the outputs of an hpseg that wrote no marker yet."""
    entries = {name for name in os.listdir(folder) if not is_temporary(name)}
    return required in entries and entries <= set(names)


@dataclass(frozen=True)
class OutputFolder:
    """The output folder of one hpseg command and the one rule of every such folder (``predict``,
    ``export --format hub``, ``eval``, ``demo``, ``clusters``, ``report``).

    The folder may be new, empty, or an earlier output of the same ``command`` (its
    :data:`OUTPUT_MARKER` says so, or ``earlier(path)``: the command's own files, written by an
    hpseg from before the marker); anything else -- a file, the user's own folder, the output of
    another command -- is refused with an :class:`OutputFolderError` naming the folder.
    :meth:`check` before the work (nothing written), :meth:`claim` when the writing starts.
    """

    path: Path
    command: str
    earlier: Callable[[Path], bool] | None = None
    option: str = "--out"

    @property
    def written_by(self) -> str:
        return f"hpseg {self.command}"

    def check(self) -> Path:
        """The path if the command may write there; raises :class:`OutputFolderError` otherwise."""
        folder, option = self.path, self.option
        if folder.exists() and not folder.is_dir():
            raise OutputFolderError(f"{option} {folder} is a file, not a folder: pick a new or empty {option} folder")
        if not folder.is_dir():
            return folder
        previous = _written_by(folder)
        entries = sorted(name for name in os.listdir(folder) if not is_temporary(name) and name != OUTPUT_MARKER)
        if not entries or previous == self.written_by:
            return folder
        if previous is None and self.earlier is not None and self.earlier(folder):
            return folder
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        whose = f"it is the output of {previous}" if previous else f"no {OUTPUT_MARKER} marks it as {self.written_by}'s"
        raise OutputFolderError(
            f"{option} {folder} already holds {shown} ({whose}): {self.written_by} writes only into a new or empty "
            f"folder or its own earlier output; pick another {option} folder, or move those files away")

    def claim(self) -> Path:
        """:meth:`check`, then create the folder and mark it as the command's; returns the path."""
        folder = self.check()
        if _written_by(folder) != self.written_by:
            write_json_atomic({"written_by": self.written_by,
                               "note": f"{self.written_by} may write into this folder again, replacing its own outputs"},
                              folder / OUTPUT_MARKER)
        return folder


def claim_output_folder(folder: str | os.PathLike[str], command: str, **rule: Any) -> Path:
    """``OutputFolder(Path(folder), command, **rule).claim()``: for a command that writes at once."""
    return OutputFolder(Path(folder), command, **rule).claim()
