"""The folder of ``hpseg demo --out DIR``: the demo replaces only what it wrote itself.

The folder follows the rule of every output folder (:func:`hpseg.files.claim_output_folder`): new,
empty, or an earlier demo's (marked by :data:`hpseg.files.OUTPUT_MARKER`); anything else stops the
demo with a message naming the folder, before anything is written or deleted. In an earlier
demo's folder the demo removes the entries it writes (``data/``, ``run/``, ``figure.png``, ...)
and writes them again; files the user added beside them stay.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from hpseg.files import OUTPUT_MARKER, claim_output_folder, write_json_atomic

__all__ = ["DEMO_ENTRIES", "LEGACY_MANIFEST", "claim_demo_folder"]

logger = logging.getLogger(__name__)

#: The manifest that marked a demo's folder before the common marker (hpseg 0.x demo folders).
LEGACY_MANIFEST = "hpseg-demo.json"
#: What the demo writes into its folder (the random backbone's file is named by its backbone).
DEMO_ENTRIES = ("data", "run", "figure.png", "metrics.json", "backbone-*-random.safetensors")


def _present(out: Path) -> list[Path]:
    """The entries of ``out`` that have one of the demo's names."""
    found: set[Path] = set()
    for pattern in DEMO_ENTRIES:
        found.update(out.glob(pattern))
    return sorted(found)


def claim_demo_folder(out: Path) -> None:
    """Make ``out`` the demo's folder (:func:`hpseg.files.claim_output_folder`) and remove what a
    previous demo wrote there. Raises :class:`hpseg.files.OutputFolderError` naming the folder."""
    legacy = out / LEGACY_MANIFEST
    if legacy.is_file() and not (out / OUTPUT_MARKER).exists():
        # A demo folder of an earlier hpseg: its manifest says the same as the common marker.
        write_json_atomic({"written_by": "hpseg demo"}, out / OUTPUT_MARKER)
        legacy.unlink()
    claim_output_folder(out, "demo")
    for path in _present(out):
        logger.info("replacing the previous demo's %s", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
