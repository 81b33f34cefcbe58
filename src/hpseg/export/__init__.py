"""Taking a trained segmenter elsewhere: ONNX (:mod:`.onnx`, runs with :mod:`.runtime` and no
PyTorch), the Hugging Face Hub folder (:mod:`.hub`: writing and pushing it; its format and
reader are :mod:`hpseg.checkpoints.hub_folder`'s, and ``hpseg.load`` reads it like any source).
The commands are in :mod:`hpseg.cli.export` and :mod:`hpseg.cli.app`.

Nothing is imported here: :mod:`.runtime` must stay importable where torch is not installed,
and onnx / huggingface_hub are optional extras.
"""

from __future__ import annotations

from hpseg.errors import HpsegError


class MissingExtraError(HpsegError, ImportError):
    """An optional extra (onnx, hub, app) is not installed; the message names the pip command."""


def missing_extra(extra: str, package: str, error: ImportError) -> MissingExtraError:
    """The error to raise when an optional extra is not installed (names the pip command)."""
    return MissingExtraError(f"{package} is not installed ({error}); install it with: pip install \"hpseg[{extra}]\"")
