"""README's demo table is what ``hpseg demo`` prints: the demo at its defaults (seed 0) must print
README's seed-0 row. When the numbers change on purpose, ``python benchmarks/demo_readme.py``
regenerates the table and ``docs/demo.png``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.demo_readme import README, printed_numbers, readme_row

DEMO_OUTPUT = """
                         k-means on     HP (cluster   k-means on
                         raw features   probe)        HP's features
  unsupervised accuracy   66.0           74.1          68.7
  unsupervised mIoU       51.3           59.7          54.1
  linear accuracy         86.3           82.6
"""


def test_printed_numbers_are_read_column_by_column() -> None:
    assert printed_numbers(DEMO_OUTPUT) == ((66.0, 51.3), (74.1, 59.7), (68.7, 54.1))
    with pytest.raises(ValueError, match="unsupervised mIoU"):
        printed_numbers(DEMO_OUTPUT.replace("mIoU", "miou"))


def test_readme_row_is_read_between_the_markers() -> None:
    table = ("<!-- --8<-- [start:demo-table] -->\n| `--seed` | a | b | c | wall time |\n|---|---|---|---|---|\n"
             "| 0 | 66.0 / 51.3 | 74.1 / 59.7 | 68.7 / 54.1 | 110 s |\n"
             "| 1 | 1.0 / 2.0 | 3.0 / 4.0 | 5.0 / 6.0 | 99 s |\n<!-- --8<-- [end:demo-table] -->\n")
    assert readme_row(table, 0) == ((66.0, 51.3), (74.1, 59.7), (68.7, 54.1))
    assert readme_row(table, 1) == ((1.0, 2.0), (3.0, 4.0), (5.0, 6.0))
    with pytest.raises(ValueError, match="seed 2"):
        readme_row(table, 2)
    with pytest.raises(ValueError, match="seed 0"):
        readme_row("| 0 | 66.0 / 51.3 | 74.1 / 59.7 | 68.7 / 54.1 | 110 s |", 0)  # outside the markers


@pytest.mark.slow
def test_demo_at_its_defaults_prints_readmes_seed_0_row(tmp_path: Path) -> None:
    """About two minutes on two CPU cores: the demo exactly as a user first runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "hpseg", "--quiet", "demo", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr
    assert printed_numbers(done.stdout) == readme_row(README.read_text(), 0), (
        "hpseg demo no longer prints README's seed-0 row: if the change is intended, run "
        "`python benchmarks/demo_readme.py` to regenerate README's table and docs/demo.png")
