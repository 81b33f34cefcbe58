"""The command line's own error: a command given inputs it cannot work with."""

from __future__ import annotations

from hpseg.errors import HpsegError

__all__ = ["UsageError"]


class UsageError(HpsegError, ValueError):
    """Arguments a command cannot work with; the message says which and what to do instead."""
