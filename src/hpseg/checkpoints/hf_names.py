"""``hf://owner/name[@revision]``: a model repository on the Hugging Face Hub, parsed and checked
in one place before anything touches the disk or the network.

The repository id follows the Hub's rules (``huggingface_hub.utils.validate_repo_id``: 1 to 96
characters of letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``; not starting or ending
with ``-`` or ``.``; not ending with ``.git``), with the owner required. A revision is a git
branch or tag name (git's ``check-ref-format`` rules: no ``..``, no part starting with ``.`` or
ending with ``.lock``, none of ``~^:?*[\\`` or spaces, no ``@{``, no ``//``, no leading or
trailing ``/``) or a commit hash. Both become part of paths in the Hub cache, so a name such as
``hf://owner/name@../../../outside/FILE`` must be refused here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hpseg.checkpoints.store import CheckpointError

__all__ = ["HF_SCHEME", "HubName", "fetch_hub_name", "parse_hub_name"]

HF_SCHEME = "hf://"

#: One part of a repository id, as ``huggingface_hub``'s ``REPO_ID_REGEX``: word characters,
#: ``-`` and ``.``, starting and ending on a letter, digit or ``_``.
_REPO_PART = re.compile(r"\b[\w\-.]{1,96}\b", re.ASCII)
_MAX_REPO_ID = 96
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_MAX_REVISION = 255


@dataclass(frozen=True)
class HubName:
    """A checked ``hf://`` name: ``repo_id`` (``owner/name``) and ``revision`` (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HF_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def _repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a Hub model repository id ``owner/name``, or None."""
    parts = repo_id.split("/")
    if len(parts) != 2:
        return "expected owner/name (one '/')"
    if len(repo_id) > _MAX_REPO_ID + 1 + _MAX_REPO_ID or any(not _REPO_PART.fullmatch(p) for p in parts):
        return ("owner and name are 1 to 96 letters, digits, '-', '_' or '.', not starting or ending with "
                "'-' or '.'")
    if any(p.startswith((".", "-")) or p.endswith((".", "-")) for p in parts):
        return "owner and name cannot start or end with '-' or '.'"
    if "--" in repo_id or ".." in repo_id:
        return "'--' and '..' are not allowed"
    if repo_id.endswith(".git"):
        return "a repository id cannot end with '.git'"
    return None


def _revision_problem(revision: str) -> str | None:
    """Why ``revision`` is not a git branch, tag or commit name, or None."""
    if not revision or len(revision) > _MAX_REVISION:
        return f"a revision is 1 to {_MAX_REVISION} characters"
    if _REF_FORBIDDEN.search(revision):
        return "a revision has no spaces, control characters or any of ~^:?*[\\"
    if ".." in revision or "@{" in revision or "//" in revision or revision == "@":
        return "a revision has no '..', '@{' or '//'"
    if revision.startswith("/") or revision.endswith(("/", ".")):
        return "a revision does not start with '/' nor end with '/' or '.'"
    if any(part.startswith(".") or part.endswith(".lock") for part in revision.split("/")):
        return "no part of a revision starts with '.' or ends with '.lock'"
    return None


def parse_hub_name(text: str) -> HubName:
    """``hf://owner/name[@revision]`` -> :class:`HubName`; CheckpointError saying what is wrong."""
    if not text.startswith(HF_SCHEME):
        raise CheckpointError(f"{text!r} is not a Hub name of the form {HF_SCHEME}owner/name[@revision]")
    repo_id, _, revision = text[len(HF_SCHEME):].partition("@")
    problem = _repo_id_problem(repo_id)
    if problem:
        raise CheckpointError(f"{text!r}: {repo_id!r} is not a Hub repository id ({problem}); "
                              f"expected {HF_SCHEME}owner/name[@revision]")
    if "@" in text[len(HF_SCHEME):]:
        problem = _revision_problem(revision)
        if problem:
            raise CheckpointError(f"{text!r}: {revision!r} is not a revision (a branch, tag or commit: {problem})")
    return HubName(repo_id, revision or None)


def fetch_hub_name(name: HubName) -> Path:
    """The snapshot folder of ``name`` in the Hugging Face cache (downloaded when missing and allowed).

    Goes through ``huggingface_hub.snapshot_download`` (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and
    the user's token honoured); the folder is checked to lie inside the cache.
    """
    try:
        # Lazy: an optional extra, only needed for hf:// names.
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as error:
        raise CheckpointError(f"{name}: huggingface_hub is not installed ({error}); install it with: "
                              'pip install "hpseg[hub]"') from None
    try:
        folder = Path(snapshot_download(name.repo_id, revision=name.revision, repo_type="model"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(f"{name}: the repository is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                              f"and cannot be downloaded{offline}: {type(error).__name__}: {error}") from None
    cache = Path(constants.HF_HUB_CACHE).resolve()
    if not folder.resolve().is_relative_to(cache):
        raise CheckpointError(f"{name}: the Hub library answered with {folder}, outside its cache {cache}: refused")
    return folder
