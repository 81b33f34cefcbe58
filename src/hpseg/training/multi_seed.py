"""``hpseg train ... --seeds 0 1 2``: one configuration, several seeds, evaluated and reported.

Each seed trains in ``<run-dir>/seed-<s>/`` (config identical but ``train.seed``), one after the
other -- or, when several CUDA devices are visible and ``train.device=auto``, one seed per device
in parallel (each a ``python -m hpseg train`` process) -- then each run's selected checkpoint (its
``train.selection``) is evaluated and ``hpseg report`` writes ``<run-dir>/report/``.
A seed whose run already finished is not trained again, so an interrupted sweep is continued by
running the same command.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hpseg.checkpoints.payload import load_checkpoint
from hpseg.config import Config
from hpseg.errors import InvalidInputError
from hpseg.evaluation.protocol import evaluate_checkpoint
from hpseg.evaluation.report import write_report
from hpseg.files import write_text_atomic
from hpseg.training.trainer import resume, train

__all__ = ["seed_run_dir", "train_seeds"]

logger = logging.getLogger(__name__)


def seed_run_dir(run_dir: str | Path, seed: int) -> Path:
    return Path(run_dir) / f"seed-{seed}"


def _state(run: Path) -> str:
    """"new", "partial" (a last.pt short of the run's total steps) or "finished"."""
    last = run / "checkpoints" / "last.pt"
    if not last.is_file():
        return "new"
    payload = load_checkpoint(last)
    finished = payload.training is None or (payload.step or 0) >= payload.training.total_steps
    return "finished" if finished else "partial"


def _devices(config: Config) -> list[str]:
    if config.train.device != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def train_command(preset: Path, run: Path, device: str) -> list[str]:
    """The command line training one seed's run on ``device`` from its full config ``preset``."""
    return [sys.executable, "-m", "hpseg", "train", "--preset", str(preset), "--run-dir", str(run), "--no-progress",
            f"train.device={device}"]


def _train_in_processes(configs: list[Config], runs: list[Path], devices: Sequence[str],
                        command: Callable[[Path, Path, str], list[str]] = train_command) -> None:
    """One process per run (``command``), at most one per device at a time."""
    pending = list(zip(configs, runs))
    active: list[tuple[subprocess.Popen, Path, str]] = []
    free = list(devices)
    while pending or active:
        while pending and free:
            config, run = pending.pop(0)
            device = free.pop(0)
            run.mkdir(parents=True, exist_ok=True)
            preset = run / "requested-config.yaml"  # the seed's full config, read back as a preset
            write_text_atomic(config.to_yaml(), preset)
            with (run / "train.log").open("w") as log:
                active.append((subprocess.Popen(command(preset, run, device), stdout=log, stderr=subprocess.STDOUT),
                               run, device))
        process, run, device = active.pop(0)
        if process.wait() != 0:
            raise RuntimeError(f"training of {run} failed (exit {process.returncode}); see {run / 'train.log'}")
        free.append(device)


def train_seeds(config: Config, run_dir: str | Path, seeds: Sequence[int], *, evaluate: bool = True,
                crf: bool = False) -> dict[str, Any]:
    """Train ``config`` once per seed, evaluate each run's selected checkpoint, write the report.

    Returns ``{"runs": [run folders], "report": summary of
    :func:`hpseg.evaluation.report.write_report` or None}``.
    """
    if len(set(seeds)) != len(seeds):
        raise InvalidInputError(f"--seeds {' '.join(map(str, seeds))}: each seed once")
    run_dir = Path(run_dir)
    configs, runs = [], []
    for seed in seeds:
        seeded = copy.deepcopy(config)
        seeded.train.seed, seeded.train.run_name = int(seed), f"seed-{seed}"
        configs.append(seeded)
        runs.append(seed_run_dir(run_dir, seed))
    states = [_state(r) for r in runs]
    todo = [(c, r) for c, r, state in zip(configs, runs, states) if state == "new"]
    for c, r, state in zip(configs, runs, states):
        if state == "finished":
            logger.info("seed %s: %s already finished, not trained again", c.train.seed, r)
        elif state == "partial":
            logger.info("seed %s: continuing the interrupted run in %s", c.train.seed, r)
            resume(r)
    devices = _devices(config)
    if devices and len(todo) > 1:
        logger.info("training %d seeds in parallel on %s", len(todo), ", ".join(devices))
        _train_in_processes([c for c, _ in todo], [r for _, r in todo], devices)
    else:
        for seeded, run in todo:
            logger.info("seed %s: training into %s", seeded.train.seed, run)
            train(seeded, run_dir=run)
    if not evaluate:
        return {"runs": runs, "report": None}
    for run in runs:
        result = evaluate_checkpoint(run, crf=crf)
        logger.info("%s: evaluated %s (%s rule) -> %s", run, result["checkpoint"], result["selection_rule"],
                    result["out_dir"])
    summary = write_report(runs, run_dir / "report")
    return {"runs": runs, "report": summary}
