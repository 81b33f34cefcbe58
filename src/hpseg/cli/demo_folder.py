"""The folder of ``hpseg demo --out DIR``: the demo replaces only what it wrote itself.

The demo marks its folder with a manifest, ``hpseg-demo.json``, written before anything else
and listing the entries it writes (``data/``, ``run/``, ``figure.png``, ...). A later demo run
into the same folder removes those entries and writes them again; an entry of one of those
names that the manifest does not list -- the user's own ``run/`` or ``data/`` -- stops the demo
with a message naming the folder, before anything is written or deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
from fnmatch import fnmatch
from pathlib import Path

from hpseg.cli.errors import UsageError
from hpseg.files import write_json_atomic

__all__ = ["DEMO_ENTRIES", "MANIFEST_NAME", "claim_demo_folder"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "hpseg-demo.json"
#: What the demo writes into its folder (the random backbone's file is named by its backbone).
DEMO_ENTRIES = ("data", "run", "figure.png", "metrics.json", "backbone-*-random.safetensors")


def _owned_entries(out: Path) -> set[str]:
    """The entries the manifest in ``out`` lists as the demo's (empty without a manifest)."""
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        return set()
    try:
        entries = json.loads(manifest.read_text()).get("entries", [])
    except (ValueError, AttributeError, OSError) as error:
        raise UsageError(f"{manifest} is damaged ({error}): delete {out} yourself, or pick another --out folder") from None
    return {str(name) for name in entries}


def _present(out: Path) -> list[Path]:
    """The entries of ``out`` that have one of the demo's names."""
    found: set[Path] = set()
    for pattern in DEMO_ENTRIES:
        found.update(out.glob(pattern))
    return sorted(found)


def claim_demo_folder(out: Path) -> None:
    """Make ``out`` the demo's folder: refuse entries the demo did not write, remove the ones a
    previous demo wrote, write the manifest. Raises :class:`UsageError` naming the folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: pick another --out folder")
    owned = _owned_entries(out) if out.is_dir() else set()
    present = _present(out) if out.is_dir() else []
    foreign = [path.name for path in present if not any(fnmatch(path.name, entry) for entry in owned)]
    if foreign:
        raise UsageError(
            f"{out} already holds {', '.join(foreign)} that hpseg demo did not write (no {MANIFEST_NAME} lists "
            f"them): the demo would replace them; pick another --out folder, or move them away")
    for path in present:
        logger.info("replacing the previous demo's %s", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"written_by": "hpseg demo", "entries": list(DEMO_ENTRIES),
                       "note": "hpseg demo replaces the entries listed here when it runs into this folder again"},
                      out / MANIFEST_NAME)

