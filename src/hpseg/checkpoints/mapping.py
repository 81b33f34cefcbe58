"""Where a checkpoint's evaluations live, and the cluster -> class mapping they recorded.

``hpseg eval`` writes ``results.json`` (with ``cluster_to_class``, the Hungarian matching of the
cluster probe to the classes) into :func:`evaluation_dir`; ``hpseg predict`` and
:func:`hpseg.load` find it there again with :func:`find_mapping`. Both sides use the one
function, so the place written and the place searched cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpseg.errors import HpsegError

__all__ = ["MappingError", "check_mapping", "evaluation_dir", "find_mapping", "read_mapping"]

#: The folder of a run's checkpoints (``<run>/checkpoints/last.pt``).
RUN_CHECKPOINTS = "checkpoints"


class MappingError(HpsegError, ValueError):
    """A cluster -> class mapping file that cannot be used; the message names the file and why."""


def evaluation_dir(checkpoint: str | Path, crf: bool = False) -> Path:
    """The default output folder of ``hpseg eval`` for ``checkpoint``.

    A run's checkpoint (``<run>/checkpoints/<name>.pt``) is evaluated into
    ``<run>/eval-<name>[-crf]``; any other checkpoint (an imported one, a copied file) into
    ``eval-<name>[-crf]`` beside it, so that an evaluation never lands outside the folder
    holding its checkpoint.
    """
    checkpoint = Path(checkpoint)
    folder = checkpoint.parent.parent if checkpoint.parent.name == RUN_CHECKPOINTS else checkpoint.parent
    return folder / f"eval-{checkpoint.stem}{'-crf' if crf else ''}"


def _records_checkpoint(candidate: Path, checkpoint: Path, step: Any) -> bool:
    """Whether ``candidate`` is an evaluation's results of ``checkpoint`` (same file name and step)."""
    try:
        results = json.loads(candidate.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(results, dict) and "cluster_to_class" in results
            and Path(str(results.get("checkpoint", ""))).name == checkpoint.name
            and results.get("step") == step)


def find_mapping(checkpoint: str | Path, step: Any, crf: bool = False) -> Path | None:
    """The ``results.json`` of an evaluation of ``checkpoint`` (recorded for its file name and
    ``step``): in :func:`evaluation_dir` with the CRF setting ``crf`` first, then with the other
    one (a CRF evaluation matches clusters to classes on CRF-refined maps, so ``hpseg predict
    --crf`` prefers it), then a ``results.json`` beside the checkpoint."""
    checkpoint = Path(checkpoint)
    candidates = [evaluation_dir(checkpoint, crf) / "results.json", evaluation_dir(checkpoint, not crf) / "results.json",
                  checkpoint.parent / "results.json"]
    return next((c for c in candidates if _records_checkpoint(c, checkpoint, step)), None)


def read_mapping(path: str | Path, n_clusters: int, n_classes: int, step: Any = None) -> list[int]:
    """The cluster -> class list of an evaluation's ``results.json`` (key ``cluster_to_class``)
    or of a JSON list; checked against the model's sizes and, when both say, the step."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise MappingError(f"cannot read the cluster->class mapping {path}: {error}") from None
    if isinstance(value, dict):
        if "cluster_to_class" not in value:
            raise MappingError(f"{path} has no 'cluster_to_class' entry (expected the results.json of `hpseg eval`)")
        if step is not None and value.get("step") is not None and value["step"] != step:
            raise MappingError(f"{path} was computed for the checkpoint of step {value['step']}, "
                               f"not this one (step {step}): evaluate this checkpoint with `hpseg eval`")
        value = value["cluster_to_class"]
    return check_mapping(value, n_clusters, n_classes, f"{path}: cluster_to_class")


def check_mapping(value: Any, n_clusters: int, n_classes: int, where: str) -> list[int]:
    """``value`` if it is a cluster -> class list for these sizes (-1: a cluster matched to no
    class); MappingError starting with ``where`` otherwise."""
    if (not isinstance(value, list) or len(value) != n_clusters
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise MappingError(f"{where} must be a list of {n_clusters} integers (one class per cluster)")
    if any(v < -1 or v >= n_classes for v in value):
        raise MappingError(f"{where} holds ids outside -1..{n_classes - 1}")
    return value
