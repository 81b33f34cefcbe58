"""Progress bars and log records on stderr: readable on a terminal and in a redirected log file."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from hpseg.logs import configure_logging, progress_bar

CURSOR_UP = "\x1b[A"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _nested_run(logger: logging.Logger) -> None:
    """A training-like loop: an outer bar, a transient inner bar (validation) and a record per step."""
    for step in progress_bar(range(3), logger, desc="train"):
        for _ in progress_bar(range(2), logger, desc="evaluate", leave=False):
            pass
        logger.info("step %d: validated", step)


@pytest.fixture
def hpseg_logging():
    logger = logging.getLogger("hpseg")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:], logger.propagate = handlers, propagate
    logger.setLevel(level)


def test_log_file_gets_no_cursor_moves(monkeypatch: pytest.MonkeyPatch, hpseg_logging: None) -> None:
    log_file = io.StringIO()  # not a terminal, like `hpseg train ... 2> train.log`
    monkeypatch.setattr(sys, "stderr", log_file)
    configure_logging(0)
    _nested_run(logging.getLogger("hpseg.training"))
    text = log_file.getvalue()
    assert CURSOR_UP not in text
    assert [f"step {k}: validated" in text for k in range(3)] == [True] * 3
    assert "train: 100%" in text and "evaluate" not in text  # the outer bar stays, the nested one is left out


def test_terminal_keeps_the_nested_bar(monkeypatch: pytest.MonkeyPatch, hpseg_logging: None) -> None:
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    configure_logging(0)
    _nested_run(logging.getLogger("hpseg.training"))
    assert "evaluate" in screen.getvalue() and "step 2: validated" in screen.getvalue()


def test_quiet_shows_no_bar(monkeypatch: pytest.MonkeyPatch, hpseg_logging: None) -> None:
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    configure_logging(-1)
    _nested_run(logging.getLogger("hpseg.training"))
    assert screen.getvalue() == ""
