"""hpseg: unsupervised semantic segmentation with Hidden Positives on frozen self-supervised ViTs.

``hpseg.load(source)`` returns a :class:`hpseg.inference.segmenter.Segmenter` (see :func:`hpseg.inference.segmenter.load`)
of a checkpoint file, a run folder, a hub folder, an ``hf://`` name or an authors' checkpoint.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Segmenter", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # Lazy: ``import hpseg`` (e.g. for the CLI's --version) does not import torch.
    if name == "load":
        from hpseg.inference.segmenter import load

        return load
    if name == "Segmenter":
        from hpseg.inference.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'hpseg' has no attribute {name!r}")
