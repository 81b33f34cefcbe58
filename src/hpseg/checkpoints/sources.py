"""The one resolver of what a user names as a trained model: ``resolve_source(text) -> Source``.

Every entry point (``hpseg.load``, ``predict``, ``eval``, ``app``, ``export``, ``clusters``)
hands the user's text to :func:`hpseg.checkpoints.trained.load_trained`, which calls this. A
source is, checked in this order:

* ``hf://owner/name[@revision]``: a hub folder on the Hugging Face Hub, through its cache
  (:mod:`hpseg.checkpoints.hf_names`; the name is checked before anything is looked up);
* a folder holding ``config.yaml``: a run folder, standing for the checkpoint its
  ``train.selection`` rule chose (:mod:`hpseg.checkpoints.runs`);
* a folder holding ``config.json``: a hub folder (:mod:`hpseg.checkpoints.hub_folder`);
* a released model's name (``hp/cocostuff27-vits8``, :mod:`hpseg.checkpoints.released`) that is
  not also a local path: its verified, downloaded authors' checkpoint file;
* a file: an hpseg checkpoint or an authors' checkpoint, told apart by content when read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from hpseg.checkpoints.hf_names import HF_SCHEME, fetch_hub_name, parse_hub_name
from hpseg.checkpoints.hub_folder import CONFIG, is_hub_folder
from hpseg.checkpoints.released import ReleasedModel, fetch_released, is_released_name, released_source
from hpseg.checkpoints.runs import RUN_CONFIG, is_run_folder, selected_checkpoint
from hpseg.checkpoints.store import CheckpointError

__all__ = ["Source", "SourceKind", "names_a_source", "resolve_source"]


class SourceKind(enum.Enum):
    """What a user named; the value is how messages call it."""

    FILE = "checkpoint file"
    RUN = "run folder"
    HUB = "hub folder"
    HF = "hf:// name"
    RELEASED = "released model"

    @property
    def is_hub(self) -> bool:
        """Whether the source is read as a hub folder (rather than as a checkpoint file)."""
        return self in (SourceKind.HUB, SourceKind.HF)


@dataclass(frozen=True)
class Source:
    """A resolved source: its ``kind``, the local ``path`` to read (a checkpoint file or a hub
    folder), the ``name`` the user gave (shown in messages and outputs) and, for a released
    model, its registry entry (its dataset names the classes of the authors' file)."""

    kind: SourceKind
    path: Path
    name: str
    released: ReleasedModel | None = None


def names_a_source(text: str | Path) -> bool:
    """Whether ``text`` names a trained model rather than something else (e.g. a backbone name):
    an ``hf://`` name, a released model's name or an existing file or folder."""
    return str(text).startswith(HF_SCHEME) or is_released_name(str(text)) or Path(text).exists()


def resolve_source(source: str | Path) -> Source:
    """The local file or folder ``source`` stands for (see the module docstring); CheckpointError
    naming ``source`` when it is none of them."""
    text = str(source)
    if text.startswith(HF_SCHEME):
        folder = fetch_hub_name(parse_hub_name(text))
        if not is_hub_folder(folder):
            raise CheckpointError(f"{text}: no hpseg {CONFIG} in the repository (expected a folder written by "
                                  "`hpseg export --format hub`)")
        return Source(SourceKind.HF, folder, text)
    released = released_source(text)
    if released is not None:
        return Source(SourceKind.RELEASED, fetch_released(released.name), text, released)
    path = Path(source)
    if path.is_dir():
        if is_run_folder(path):
            return Source(SourceKind.RUN, selected_checkpoint(path), text)
        if is_hub_folder(path):
            return Source(SourceKind.HUB, path, text)
        raise CheckpointError(f"{path} is a folder but neither a run folder (no {RUN_CONFIG}) nor a hub folder "
                              f"(no {CONFIG}): pass a checkpoint file, a run folder or a folder written by "
                              "`hpseg export --format hub`")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return Source(SourceKind.FILE, path, text)
