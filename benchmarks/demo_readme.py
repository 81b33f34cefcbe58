"""Regenerate README's demo table and ``docs/demo.png`` from what ``hpseg demo`` prints.

    python benchmarks/demo_readme.py                 # seeds 0 1 2, rewrites README.md and docs/demo.png
    python benchmarks/demo_readme.py --seeds 0 --work /tmp/demo --check   # compare only, write nothing

Runs ``hpseg demo --seed S`` at its defaults for every seed (about two minutes each on two CPU
cores), reads the unsupervised accuracy / mIoU of its three columns from the table it prints,
and replaces the block between README's ``demo-table`` markers with a table of them (plus their
mean and the wall time of each run), stating this command and the commit it ran on. The figure
of the first seed becomes ``docs/demo.png``. ``tests/test_demo_readme.py`` runs the demo at its
defaults and checks the printed seed-0 numbers against README's row with :func:`readme_row` and
:func:`printed_numbers`, so the table cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FIGURE = ROOT / "docs" / "demo.png"
START, END = "<!-- --8<-- [start:demo-table] -->", "<!-- --8<-- [end:demo-table] -->"
#: The demo's columns, in the order of its printed table and of README's.
COLUMNS = ("k-means on raw features", "HP, cluster probe", "k-means on HP's features")


def printed_numbers(stdout: str) -> tuple[tuple[float, float], ...]:
    """(unsupervised accuracy, unsupervised mIoU) of each column of the table ``hpseg demo`` prints."""
    rows = {}
    for metric in ("accuracy", "mIoU"):
        match = re.search(rf"^\s*unsupervised {metric}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", stdout, re.M)
        if match is None:
            raise ValueError(f"no 'unsupervised {metric}' row with three numbers in the demo's output:\n{stdout}")
        rows[metric] = [float(v) for v in match.groups()]
    return tuple(zip(rows["accuracy"], rows["mIoU"]))


def printed_seconds(stdout: str) -> int:
    match = re.search(r"^took (\d+) s", stdout, re.M)
    if match is None:
        raise ValueError("no 'took N s' line in the demo's output")
    return int(match.group(1))


def readme_row(text: str, seed: int) -> tuple[tuple[float, float], ...]:
    """README's numbers for ``seed``: (accuracy, mIoU) of each column of the demo table."""
    table = text.split(START, 1)[1].split(END, 1)[0] if START in text else ""
    match = re.search(rf"^\| {seed} \|((?: [\d.]+ / [\d.]+ \|){{3}})", table, re.M)
    if match is None:
        raise ValueError(f"README.md has no demo-table row for seed {seed} between its demo-table markers")
    pairs = re.findall(r"([\d.]+) / ([\d.]+)", match.group(1))
    return tuple((float(a), float(m)) for a, m in pairs)


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+local changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _table(runs: dict[int, tuple[tuple[tuple[float, float], ...], int]], command: str) -> str:
    def cell(pair: tuple[float, float]) -> str:
        return f"{pair[0]:.1f} / {pair[1]:.1f}"

    load = f", load average {os.getloadavg()[2]:.1f} over the last 15 minutes" if hasattr(os, "getloadavg") else ""
    lines = [f"Measured with `{command}` on commit `{_commit()}`, on {os.cpu_count()} CPU cores{load}",
             "(the wall time depends on the machine and its load). Unsupervised accuracy / mIoU, percent:", "",
             "| `--seed` | " + " | ".join(COLUMNS) + " | wall time |", "|---|---|---|---|---|"]
    for seed, (numbers, seconds) in runs.items():
        lines.append(f"| {seed} | " + " | ".join(cell(pair) for pair in numbers) + f" | {seconds} s |")
    if len(runs) > 1:
        means = [tuple(sum(numbers[c][i] for numbers, _ in runs.values()) / len(runs) for i in range(2))
                 for c in range(len(COLUMNS))]
        lines.append("| mean | " + " | ".join(cell(pair) for pair in means) + " | |")
    return "\n".join(lines)


def run_demo(seed: int, out: Path) -> str:
    """``hpseg demo --seed SEED --out OUT`` at its defaults; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "hpseg", "--quiet", "demo", "--seed", str(seed), "--out", str(out)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"hpseg demo --seed {seed} failed:\n{done.stderr}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", help="folder for the demo runs (default: a temporary folder)")
    parser.add_argument("--check", action="store_true", help="compare with README only, write nothing")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hpseg-demo-readme-"))
    runs = {}
    for seed in args.seeds:
        stdout = run_demo(seed, work / f"seed-{seed}")
        runs[seed] = (printed_numbers(stdout), printed_seconds(stdout))
        print(f"seed {seed}: " + ", ".join(f"{c} {a:.1f} / {m:.1f}" for c, (a, m) in zip(COLUMNS, runs[seed][0])),
              flush=True)
    text = README.read_text()
    if args.check:
        wrong = [s for s in runs if readme_row(text, s) != runs[s][0]]
        print("README matches" if not wrong else f"README differs for seeds {wrong}")
        return 1 if wrong else 0
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    command = "python benchmarks/demo_readme.py" + ("" if args.seeds == [0, 1, 2] else f" --seeds {' '.join(map(str, args.seeds))}")
    head, rest = text.split(START, 1)
    README.write_text(f"{head}{START}\n{_table(runs, command)}\n{END}{rest.split(END, 1)[1]}")
    shutil.copyfile(work / f"seed-{args.seeds[0]}" / "figure.png", FIGURE)
    print(f"rewrote README.md's demo table and {FIGURE.relative_to(ROOT)} (from seed {args.seeds[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
