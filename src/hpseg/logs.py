"""Progress and notices through the standard :mod:`logging` module.

Library code logs to ``logging.getLogger(__name__)`` (loggers under ``"hpseg"``) and shows
progress bars with :func:`progress_bar`; it never prints. An application decides what is
shown: the ``hpseg`` command calls :func:`configure_logging` (``--quiet`` / ``--verbose``);
a user of the Python API sees nothing but warnings unless they configure logging themselves.
Progress bars are shown exactly when the ``hpseg`` logger would show INFO records, so one
switch controls both, with no ``progress`` flag threaded through the call chain.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["TqdmHandler", "byte_progress", "configure_logging", "progress_bar", "progress_counter"]

T = TypeVar("T")
_ROOT = "hpseg"


class TqdmHandler(logging.Handler):
    """Writes records through ``tqdm.write`` so they do not break a running progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def configure_logging(verbosity: int = 0) -> None:
    """Show hpseg's records on stderr: -1 warnings only (``--quiet``), 0 INFO, 1 DEBUG (``--verbose``).

    Idempotent: calling it again replaces the handler it installed.
    """
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG if verbosity > 0 else logging.WARNING)
    logger = logging.getLogger(_ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, TqdmHandler)]:
        logger.removeHandler(handler)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


#: Seconds between redraws of a bar written to a file or a pipe (a log, not a screen).
LOG_FILE_INTERVAL = 10.0


def progress_bar(iterable: Iterable[T], logger: logging.Logger, **kwargs: Any) -> Iterable[T]:
    """``tqdm(iterable, **kwargs)``, shown only when ``logger`` would emit INFO records.

    When stderr is not a terminal (redirected to a log file or a pipe), a transient bar
    (``leave=False``) drawn while another bar runs is not shown: tqdm moves the cursor up to
    redraw such a nested bar, and a file keeps those moves as ``ESC[A`` codes. The other bars
    are redrawn at most every :data:`LOG_FILE_INTERVAL` seconds there.
    """
    to_screen = sys.stderr.isatty()
    nested = kwargs.get("leave") is False and len(getattr(tqdm, "_instances", ())) > 0
    if not to_screen:
        kwargs.setdefault("mininterval", LOG_FILE_INTERVAL)
    disable = not logger.isEnabledFor(logging.INFO) or (nested and not to_screen)
    return tqdm(iterable, disable=disable, file=sys.stderr, **kwargs)


def progress_counter(logger: logging.Logger, **kwargs: Any) -> tqdm:
    """A bar advanced by hand (``bar.update(n)``, e.g. images per batch), shown as :func:`progress_bar`."""
    return tqdm(disable=not logger.isEnabledFor(logging.INFO), file=sys.stderr, **kwargs)


def byte_progress(logger: logging.Logger, total: int | None, initial: int = 0, desc: str = "") -> tqdm:
    """A byte-counting bar (``bar.update(n_bytes)``) for a download, from ``initial`` bytes (a resumed
    one) to ``total`` (None: unknown); shown only when ``logger`` would emit INFO records."""
    return progress_counter(logger, total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=desc, dynamic_ncols=True)
