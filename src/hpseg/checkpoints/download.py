"""Downloading one large checkpoint file over HTTP(S): resumable, verified, placed atomically.

:func:`download_file` is the whole job, for the released models (:mod:`.released`):

1. the bytes go to ``<target>.part``; when that file exists (an interrupted download), the
   request asks for the rest with an HTTP ``Range`` header and appends (a server that ignores
   the range and sends the whole file again starts the part over);
2. progress is shown with a byte progress bar (:func:`hpseg.logs.byte_progress`: only when the
   ``hpseg`` logger shows INFO records);
3. an HTML page where a checkpoint was expected is recognised and named: Google Drive's
   confirmation step for large files ("can't scan this file for viruses") is followed (the page
   is parsed with gdown's maintained parser, ``pip install 'hpseg[download]'``), Drive's
   download-quota page and any other HTML page are refused with what they say;
4. a body shorter than its ``Content-Length`` (a dropped connection) leaves the ``.part`` file
   for the next call to resume, and raises; a complete body that is not a PyTorch file (zip
   archive or legacy pickle) is deleted and refused;
5. the SHA-256 is computed, checked against ``expected_sha256`` when one is given, and the file
   is fsynced and renamed onto ``target`` (``os.replace``: atomic), so ``target`` only ever
   exists complete.

Only the standard library speaks HTTP here (``urllib``, with a cookie jar for Drive).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path
from typing import IO, Any

from hpseg.errors import HpsegError
from hpseg.logs import byte_progress

__all__ = ["DownloadError", "download_file", "file_sha256", "is_torch_file"]

logger = logging.getLogger(__name__)

#: Bytes read per chunk, and at most how much of an HTML answer is read to tell what it is.
_CHUNK, _HTML_LIMIT = 1 << 20, 2 << 20
#: Confirmation pages followed at most (Drive asks once; a loop means something else is wrong).
_MAX_CONFIRMATIONS = 3


class DownloadError(HpsegError, RuntimeError):
    """A file could not be downloaded, or what came is not the file (the message says which)."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_torch_file(path: Path) -> bool:
    """Whether ``path`` is a complete ``torch.save`` file: a zip archive whose central directory
    is there (a truncated archive has none) or a legacy pickle stream."""
    with path.open("rb") as stream:
        head = stream.read(4)
    if head == b"PK\x03\x04":
        return zipfile.is_zipfile(path)
    return head[:1] == b"\x80"


@dataclass
class _Answer:
    """An open HTTP response and what it holds: ``offset`` (where its body starts in the file)
    and ``total`` (the whole file's size, None when the server does not say)."""

    response: Any
    offset: int
    total: int | None


def _opener() -> urllib.request.OpenerDirector:
    # Drive's older confirmation step sets a cookie that the confirmed request must send back.
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))


def _request(opener: urllib.request.OpenerDirector, url: str, offset: int, timeout: float) -> Any:
    headers = {"User-Agent": "hpseg (python urllib)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing after ``offset``: the part is the whole file
            return error
        raise DownloadError(f"{url} answered HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DownloadError(f"cannot reach {url} ({reason})") from None


def _title(page: str) -> str:
    match = re.search(r"<title[^>]*>(.*?)</title>", page, re.IGNORECASE | re.DOTALL)
    return " ".join(match.group(1).split()) if match else "untitled"


def _drive_error(page: str) -> str | None:
    """Drive's own error text on the page (the download quota, a missing file), if any."""
    found = re.findall(r'class="uc-error-(?:subcaption|caption)"[^>]*>(.*?)<', page, re.DOTALL)
    return " ".join(" ".join(text.split()) for text in found) if found else None


def _confirmed_url(page: str, url: str) -> str:
    """The URL Drive's confirmation page for a large file points to, or DownloadError saying
    what the page is instead (Drive's quota or error message, or any other HTML page)."""
    message = _drive_error(page)
    if message is not None:
        raise DownloadError(f"{url}: Google Drive refused the download: {message!r} (for a popular file this is "
                            "its download quota: try again in a day, or download it in a browser)")
    if "download-form" not in page and "export=download" not in page:
        raise DownloadError(f"{url} sent an HTML page ({_title(page)!r}) instead of the checkpoint file")
    try:
        parser = importlib.import_module("gdown.download")  # the module, not gdown's download function
    except ImportError:
        raise DownloadError(f"{url}: Google Drive asks to confirm the download of this large file; hpseg follows "
                            "that step with gdown: pip install 'hpseg[download]'") from None
    try:
        return str(parser.get_url_from_gdrive_confirmation(page))
    except Exception as error:  # noqa: BLE001 - gdown's FileURLRetrievalError and its parser's failures alike
        raise DownloadError(f"{url} sent a Google Drive page ({_title(page)!r}) that is not the file and whose "
                            f"download link cannot be read: {error}") from None


def _open_file(url: str, offset: int, timeout: float) -> _Answer:
    """The response carrying the file's bytes from ``offset`` on (or from 0 when the server
    ignores the range), after following Drive's confirmation step."""
    opener = _opener()
    for _ in range(_MAX_CONFIRMATIONS + 1):
        response = _request(opener, url, offset, timeout)
        if getattr(response, "code", None) == 416:  # the part already holds the whole file
            response.close()
            return _Answer(None, offset, offset)
        if "text/html" not in (response.headers.get("Content-Type") or "").lower():
            return _answer(response, offset)
        page = response.read(_HTML_LIMIT).decode("utf-8", "replace")
        response.close()
        url = _confirmed_url(page, url)
        logger.info("following Google Drive's confirmation step for a large file")
    raise DownloadError(f"{url}: Google Drive kept asking for confirmation ({_MAX_CONFIRMATIONS} times)")


def _answer(response: Any, offset: int) -> _Answer:
    length = response.headers.get("Content-Length")
    content_range = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range") or "")
    if response.status == 206 and content_range:
        start, size = int(content_range[1]), content_range[2]
        if start != offset:
            response.close()
            raise DownloadError(f"{response.url}: asked for bytes from {offset}, the server sent them from {start}")
        return _Answer(response, offset, int(size) if size != "*" else None)
    if offset:
        logger.info("the server ignores ranges: downloading the whole file again")
    return _Answer(response, 0, int(length) if length and length.isdigit() else None)


def _receive(answer: _Answer, part: Path, label: str) -> int:
    """Write the answer's body into ``part`` from its offset on; returns the part's size."""
    mode = "ab" if answer.offset else "wb"
    bar = byte_progress(logger, total=answer.total, initial=answer.offset, desc=label)
    try:
        with part.open(mode) as stream:
            _copy(answer.response, stream, bar)
    finally:
        bar.close()
        answer.response.close()
    return part.stat().st_size


def _copy(response: Any, stream: IO[bytes], bar: Any) -> None:
    while True:
        try:
            chunk = response.read(_CHUNK)
        except Exception as error:  # noqa: BLE001 - http.client's IncompleteRead and socket errors: the body ends here
            logger.info("the connection broke after %s bytes: %s", f"{stream.tell():,}", error)
            return
        if not chunk:
            return
        stream.write(chunk)
        bar.update(len(chunk))


def _check_complete(part: Path, size: int, total: int | None, url: str) -> None:
    """Refuse a short or foreign body: a short one stays for resuming, a foreign one is deleted."""
    if total is not None and size < total:
        raise DownloadError(f"the download from {url} stopped after {size:,} of {total:,} bytes; the part is kept "
                            f"in {part}: run the command again to resume it")
    if total is not None and size > total:
        part.unlink()
        raise DownloadError(f"the download from {url} holds {size:,} bytes, more than the {total:,} announced; "
                            "deleted: run the command again")
    with part.open("rb") as stream:
        head = stream.read(512)
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        part.unlink()
        page = head.decode("utf-8", "replace")
        raise DownloadError(f"{url} sent an HTML page ({_title(page)!r}) instead of the checkpoint file")
    if not is_torch_file(part):
        if head.startswith(b"PK\x03\x04") and total is None:
            raise DownloadError(f"the download from {url} ended before the end of the archive ({size:,} bytes, the "
                                f"server gave no length); the part is kept in {part}: run the command again to "
                                "resume it")
        part.unlink()
        raise DownloadError(f"what {url} sent is not a PyTorch checkpoint (it starts with {head[:16]!r}); deleted")


def download_file(url: str, target: Path, *, expected_sha256: str | None = None, label: str = "download",
                  timeout: float = 60.0) -> str:
    """Download ``url`` to ``target`` (see the module docstring); returns the file's SHA-256.

    Raises :class:`DownloadError` with one line saying what went wrong; ``target`` is then
    untouched (the ``.part`` file beside it is kept only when resuming it makes sense).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if offset:
        logger.info("resuming the download of %s from byte %s", target.name, f"{offset:,}")
    answer = _open_file(url, offset, timeout)
    size = offset if answer.response is None else _receive(answer, part, label)
    _check_complete(part, size, answer.total, url)
    digest = file_sha256(part)
    if expected_sha256 is not None and digest != expected_sha256:
        part.unlink()
        raise DownloadError(f"the file from {url} has SHA-256 {digest}, not the {expected_sha256} it should have; "
                            "deleted")
    with part.open("rb+") as stream:
        os.fsync(stream.fileno())
    os.replace(part, target)
    return digest
