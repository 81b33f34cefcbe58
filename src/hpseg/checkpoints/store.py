"""hpseg checkpoints: atomic writes, safe loads (no arbitrary unpickling).

A checkpoint is a dict of tensors and plain Python values:
``format``, ``version``, ``kind`` ("last" | "best"), ``step``, ``config`` (the run's resolved
config as a dict), ``backbone`` (name, weights, pretrained), ``model`` (state dict of
:class:`hpseg.method.HiddenPositivesModel`), ``class_names``, ``metrics`` (validation metrics
at that step, may be empty), ``selection`` (how it was chosen) and, for resuming, ``training``
(optimisers, scaler, pools, random states, best score).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "hpseg-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def strip_key_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """``key`` without any of ``prefixes`` in front, repeatedly ("module.backbone.x" -> "x"): the
    wrappers that training code adds (DataParallel, torch.compile, a backbone attribute)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def save_atomic(payload: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load — it holds Python objects beyond tensors and plain values "
            f"(only weights-only checkpoints are loaded, never arbitrary pickles): {error}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or not a checkpoint): {error}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an hpseg checkpoint and check its format."""
    payload = read_torch_file(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an hpseg checkpoint (no format marker {FORMAT!r}); "
            "a checkpoint of the authors' reference code can be converted with `hpseg import-checkpoint`"
        )
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer hpseg (format version {payload['version']})")
    return payload
