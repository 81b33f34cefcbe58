"""What training checks before it starts, with errors naming the file and the problem.

* :func:`check_class_count`: ``method.n_classes`` is the class count of the labelled data
  (training crops, validation set); otherwise the linear probe would silently ignore the labels
  of the classes past it, and validation would score a different problem.
* :func:`check_prepared_recipe`: the prepared training set was made the way the run's config
  asks (crop rule, crop file format, stored and crop size, as its manifest records them); a run,
  or a resumed run (its config comes from its checkpoint), on items made otherwise is refused.

What ``hpseg train --resume RUN_DIR`` checks before continuing a run:

* the run's ``checkpoints/last.pt`` is an hpseg checkpoint with its config and its training
  state (optimisers, pools, random states): an imported or hand-made checkpoint has none;
* the state fits the run's model and optimisers;
* ``metrics.jsonl`` is cut back to the checkpoint's step; a torn record (the last line of a
  run killed, or stopped by a full disk, while writing it) is dropped with a warning instead of
  blocking the resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpseg.checkpoints.store import CheckpointError
from hpseg.checkpoints.trained import TrainedCheckpoint, read_trained, weight_mismatch_summary
from hpseg.config import Config
from hpseg.data import recipe_mismatches, training_recipe
from hpseg.errors import InvalidInputError
from hpseg.files import read_jsonl, write_text_atomic

__all__ = ["check_class_count", "check_prepared_recipe", "resumable_checkpoint", "training_state_errors",
           "truncate_metrics"]

logger = logging.getLogger(__name__)


def check_class_count(config: Config, n_classes: int, source: str | Path) -> None:
    """Stop when the labelled data from ``source`` has ``n_classes`` classes and the config another count."""
    configured = config.method.n_classes
    if configured != n_classes:
        raise InvalidInputError(f"method.n_classes={configured} but the labelled data has {n_classes} classes ({source}): "
                         f"set method.n_classes={n_classes} (more clusters than classes: method.extra_clusters)")


def check_prepared_recipe(config: Config, manifest: dict[str, object], prepared_dir: str | Path) -> None:
    """Stop when the prepared set in ``prepared_dir`` (its ``manifest``) was made otherwise than
    ``config.data`` asks, naming what differs."""
    data = config.data
    diff = recipe_mismatches(manifest, training_recipe(data.crop_rule(), data.crop_format, data.crop_size))
    if diff:
        raise InvalidInputError(
            f"{prepared_dir} holds training items made otherwise than this run's config asks ({'; '.join(diff)}): "
            "run `hpseg prepare` with this config into another data.prepared_dir, or set data.crop_format / "
            "data.potsdam_train / data.crop_size to what it holds")


def resumable_checkpoint(run_dir: Path) -> TrainedCheckpoint:
    """The ``last`` checkpoint of ``run_dir``, read once; CheckpointError when it cannot be resumed."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} holds no run to resume: {path} does not exist")
    checkpoint = read_trained(path)
    if checkpoint.payload.training is None:
        raise CheckpointError(
            f"{path} holds no training state (optimisers, pools, random states) -- an imported or exported "
            "checkpoint -- so its run cannot be resumed; start a new run (hpseg train), or evaluate / predict "
            "with it")
    return checkpoint


@contextmanager
def training_state_errors(path: Path) -> Iterator[None]:
    """Errors of restoring the training state of the checkpoint ``path`` inside the block become a
    CheckpointError naming the file: the state is incomplete, or does not fit the run."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: incomplete training state ({type(error).__name__}: {error}); "
                              "the run cannot be resumed from it") from None
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: its state does not fit the run's model and optimisers: "
                              f"{weight_mismatch_summary(str(error))}") from None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records of ``path`` up to ``last_step`` (the checkpoint resumed from), so the
    curve has no repeats; lines that are not JSON records are dropped, with a warning."""
    if not path.exists():
        return
    records, torn = read_jsonl(path)
    kept = [line for _, line, record in records if int(record.get("step", 0)) <= last_step]
    if torn:
        logger.warning("%s: dropped %d damaged line(s) (line %s: a record cut short by a crash or a full disk)",
                       path, len(torn), ", ".join(map(str, torn)))
    write_text_atomic("".join(line + "\n" for line in kept), path)
