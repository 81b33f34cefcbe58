"""The base class of the errors a user can fix.

Every error hpseg raises about its inputs (a checkpoint, a dataset folder, an image, a config
key, a missing optional extra, ...) derives from :class:`HpsegError`; its message names the file
or setting and what is wrong, so the ``hpseg`` command prints it as one line (exit status 2).
Any other exception is a bug or a failure hpseg did not foresee and keeps its traceback.

Each subclass also derives from the built-in class it has always been (``CheckpointError`` is a
``ValueError``, ``ImageReadError`` an ``OSError``, ...), so existing ``except`` clauses still
catch it. The exception classes not derived from it are
the ONNX runner's (``hpseg.export.onnx_runner``): that file runs standalone, without hpseg.
"""

from __future__ import annotations

__all__ = ["HpsegError", "InvalidInputError"]


class HpsegError(Exception):
    """An error the user can fix; the message says what is wrong and, where it can, what to do."""


class InvalidInputError(HpsegError, ValueError):
    """An argument, setting or file hpseg cannot work with (a value no narrower class covers)."""
