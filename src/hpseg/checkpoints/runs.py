"""A run folder's checkpoints: which one its ``train.selection`` rule chose, and how.

* ``best``: the authors' rule -- the highest sum of the four validation metrics, which uses
  the labels of the validation split the numbers are then reported on **[ref quirk]**;
* ``last``: the final weights; no label decides anything;
* ``unsupervised``: the highest label-free criterion (``train.unsupervised_criterion``,
  :mod:`hpseg.training.selection`) on a fixed sample of training crops, without their labels.

Each rule keeps ``<run>/checkpoints/<rule>.pt``; every command given a run folder uses that
one (:func:`selected_checkpoint`, through :func:`hpseg.checkpoints.sources.resolve_source`), so
that under ``last`` or ``unsupervised`` no labelled data influences which checkpoint they use.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hpseg.checkpoints.store import CheckpointError
from hpseg.errors import InvalidInputError

__all__ = ["RUN_CONFIG", "SELECTION_RULES", "is_run_folder", "rule_checkpoint", "selected_checkpoint",
           "selection_text"]

#: The values of ``train.selection``; rule r keeps ``checkpoints/<r>.pt``.
SELECTION_RULES = ("best", "last", "unsupervised")
#: The file that marks a run folder: the run's resolved config.
RUN_CONFIG = "config.yaml"


def selection_text(rule: str, criterion: str = "") -> str:
    """How a checkpoint of ``rule`` was chosen, as written into checkpoints and results."""
    if rule == "best":
        return "best sum of unsupervised and linear accuracy and mIoU on the validation set"
    if rule == "unsupervised":
        return f"highest label-free {criterion} on a fixed sample of training crops (no labels used)"
    return "last step"


def rule_checkpoint(run_dir: str | Path, rule: str) -> Path:
    """The checkpoint a run's selection ``rule`` designates: ``<run>/checkpoints/<rule>.pt``."""
    if rule not in SELECTION_RULES:
        raise InvalidInputError(f"train.selection={rule!r}: expected one of {', '.join(SELECTION_RULES)}")
    return Path(run_dir) / "checkpoints" / f"{rule}.pt"


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``hpseg train`` (it holds the run's ``config.yaml``)."""
    return (Path(path) / RUN_CONFIG).is_file()


def selected_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint the run's ``train.selection`` chose; CheckpointError when the folder is no
    run folder or that checkpoint is missing (training not finished, or a run of an older hpseg
    whose rule wrote no such file)."""
    run_dir = Path(run_dir)
    config_file = run_dir / RUN_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{run_dir} is a folder but not a run folder (no {RUN_CONFIG}): pass a checkpoint file")
    try:
        recorded = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CheckpointError(f"{config_file}: not readable YAML ({type(error).__name__})") from None
    train = (recorded or {}).get("train") if isinstance(recorded, dict) else None
    rule = train.get("selection", "best") if isinstance(train, dict) else "best"
    if rule not in SELECTION_RULES:
        raise CheckpointError(f"{config_file}: train.selection={rule!r}, expected one of {', '.join(SELECTION_RULES)}")
    chosen = rule_checkpoint(run_dir, rule)
    if not chosen.is_file():
        raise CheckpointError(f"{chosen} does not exist: the run's rule train.selection={rule} wrote no checkpoint "
                              "yet (did training finish?)")
    return chosen
