"""Exceptions of :mod:`hpseg.data`.

Both take a single message string as their first argument so that they survive the
round trip through a :class:`torch.utils.data.DataLoader` worker (which re-creates an
exception from its type and message).
"""

from __future__ import annotations

from pathlib import Path

from hpseg.errors import HpsegError


class DatasetLayoutError(HpsegError, ValueError):
    """A dataset directory does not have the expected layout.

    Raised by dataset constructors before any work is done, and by
    :class:`~hpseg.data.TrainCrops` when a prepared crop directory is missing or
    incomplete. The message names the missing path and shows the expected layout.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class ImageReadError(HpsegError, OSError):
    """An image or label file could not be read or decoded.

    The message names the file and the reason; ``path`` holds the file.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None

    def __str__(self) -> str:  # OSError's __str__ is fine for one arg, but be explicit
        return str(self.args[0]) if self.args else ""
