"""hpseg checkpoint files: atomic writes, safe loads (no arbitrary unpickling), the format marker.

What a checkpoint holds is :class:`hpseg.checkpoints.payload.CheckpointPayload`'s.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from hpseg.backbones.weights import short_error, unsupported_global
from hpseg.errors import HpsegError
from hpseg.files import atomic_write

FORMAT = "hpseg-checkpoint"
VERSION = 1


class CheckpointError(HpsegError, ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def save_atomic(payload: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    with atomic_write(path) as stream:
        torch.save(payload, stream)
    return Path(path)


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and say what it is."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with path.open("rb") as stream:
        head = stream.read(16)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        # Neither a zip archive (torch.save) nor a pickle (legacy torch.save): a text file, an image, ...
        what = "it is empty" if not head else f"it starts with {head!r}"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({what})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({short_error(error)})") from None
        raise CheckpointError(
            f"{path}: refused to load — it holds Python objects beyond tensors and plain values "
            f"({unsupported_global(error)}; only weights-only checkpoints are loaded, never arbitrary pickles, "
            "whose unpickling could run code)") from None
    except Exception as error:  # noqa: BLE001 - unpickling garbage fails with almost any exception type
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or damaged: "
                              f"{type(error).__name__}: {short_error(error)})") from None


def is_hpseg_checkpoint(payload: Any) -> bool:
    """Whether a loaded file carries hpseg's format marker."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def check_format(payload: Any, path: str | Path) -> dict[str, Any]:
    """``payload`` (the content of ``path``) if it is an hpseg checkpoint this version reads."""
    if not is_hpseg_checkpoint(payload):
        raise CheckpointError(
            f"{path} is not an hpseg checkpoint (no format marker {FORMAT!r}); "
            "an authors' checkpoint (hynnsk/HP) loads as it is, or is converted once with `hpseg import-checkpoint`"
        )
    version = payload.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: 'version' is {version!r}, expected a format version number")
    if version > VERSION:
        raise CheckpointError(f"{path} was written by a newer hpseg (format version {version})")
    return payload
