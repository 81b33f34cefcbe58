"""Taking a trained segmenter elsewhere: ONNX (:mod:`.onnx`, runs with :mod:`.runtime` and no
PyTorch), the Hugging Face Hub folder format (:mod:`.hub`).

Nothing is imported here: :mod:`.runtime` must stay importable where torch is not installed,
and onnx / huggingface_hub are optional extras.
"""

from __future__ import annotations


def missing_extra(extra: str, package: str, error: ImportError) -> ImportError:
    """The ImportError to raise when an optional extra is not installed (names the pip command)."""
    return ImportError(f"{package} is not installed ({error}); install it with: pip install \"hpseg[{extra}]\"")
