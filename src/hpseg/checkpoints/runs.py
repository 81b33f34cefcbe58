"""A run folder's checkpoints: which one its ``train.selection`` rule chose, and how.

* ``best``: the reference's rule -- the highest sum of the four validation metrics, which uses
  the labels of the validation split the numbers are then reported on **[ref quirk]**;
* ``last``: the final weights; no label decides anything;
* ``unsupervised``: the highest label-free criterion (``train.unsupervised_criterion``,
  :mod:`hpseg.training.selection`) on a fixed sample of training crops, without their labels.

Each rule keeps ``<run>/checkpoints/<rule>.pt``; ``hpseg eval RUN``, ``hpseg predict
--checkpoint RUN`` and ``hpseg.load(RUN)`` use that one (:func:`resolve_checkpoint`), so that
under ``last`` or ``unsupervised`` no labelled data influences which checkpoint they use.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hpseg.checkpoints.store import CheckpointError
from hpseg.errors import InvalidInputError

__all__ = ["SELECTION_RULES", "resolve_checkpoint", "rule_checkpoint", "selection_text"]

#: The values of ``train.selection``; rule r keeps ``checkpoints/<r>.pt``.
SELECTION_RULES = ("best", "last", "unsupervised")


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as it is; a run folder -> the checkpoint its ``train.selection`` chose.

    Raises CheckpointError for a folder without ``config.yaml`` or whose rule's checkpoint is
    missing (training not finished, or a run of an older hpseg whose rule wrote no such file).
    """
    path = Path(path)
    if not path.is_dir():
        return path
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is a folder but not a run folder (no config.yaml): pass a checkpoint file")
    rule = ((yaml.safe_load(config_file.read_text()) or {}).get("train") or {}).get("selection", "best")
    chosen = rule_checkpoint(path, rule)
    if not chosen.is_file():
        raise CheckpointError(f"{chosen} does not exist: the run's rule train.selection={rule} wrote no checkpoint "
                              "yet (did training finish?)")
    return chosen
