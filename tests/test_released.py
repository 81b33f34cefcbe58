"""Released models by name, against a server on 127.0.0.1 that this module starts and stops.

The server plays Google Drive (and a mirror): it serves checkpoints written here in the
authors' format (a tiny ViT, 27 COCO-Stuff classes), a Drive-style confirmation page for a
large file, Drive's quota page, an HTML error page and a truncated body. The registry is
pointed at it with ``HPSEG_RELEASED_MIRROR``; files go to ``HPSEG_HOME``. No other address is
ever contacted: without the mirror, the tests run offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hpseg
from hpseg.checkpoints import released
from hpseg.checkpoints.released import (
    ReleasedModelError,
    fetch_released,
    get_released,
    is_released_name,
    list_released,
    paper_comparison,
    released_path,
    released_source,
)
from hpseg.cli.main import main
from hpseg.data import CITYSCAPES27_CLASS_NAMES, load_cocostuff27_mapping
from tests.helpers import Notices, authors_payload, make_coco

NAME = "hp/cocostuff27-vits8"
FILE = "hp_cocostuff27_vits8.pth"
N_CLASSES, D = 27, 16


def released_bytes(seed: int = 0) -> bytes:
    """A checkpoint in the authors' format with the 27 classes of COCO-Stuff-27 (tiny ViT, D 16)."""
    payload = authors_payload(seed)
    generator = torch.Generator().manual_seed(seed)
    payload["linear_model_state_dict"] = {"weight": torch.randn(N_CLASSES, D, 1, 1, generator=generator),
                                          "bias": torch.randn(N_CLASSES, generator=generator)}
    payload["cluster_model_state_dict"] = {"clusters": torch.randn(N_CLASSES, D, generator=generator)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


BODY = released_bytes()
SHA = hashlib.sha256(BODY).hexdigest()

CONFIRMATION = (  # one line, as Drive sends it: the form names the confirmed download
    '<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>'
    '<p class="uc-warning-subcaption">Google Drive can\'t scan this file for viruses.</p>'
    '<form id="download-form" action="{base}/download" method="get">'
    '<input type="hidden" name="id" value="{file}"><input type="hidden" name="export" value="download">'
    '<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="4f2c">'
    '<input type="submit" value="Download anyway"></form></body></html>'
)
QUOTA = ('<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>'
         '<p class="uc-error-caption">Sorry, you can\'t view or download this file at this time.</p>'
         '<p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. Please try '
         'accessing the file again later.</p></body></html>')
NOT_FOUND = "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>no such file</body></html>"


class Server:
    """``routes[path] = (handler, ...)``; ``requests`` lists (path, Range header) as they come."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = urllib.parse.urlsplit(self.path).path
                outer.requests.append((self.path, self.headers.get("Range")))
                outer.routes.get(path, not_found)(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str,
         headers: dict[str, str] | None = None, cut: int | None = None, length: bool = True) -> None:
    """Answer with ``body``; ``cut``: announce it all, send the first ``cut`` bytes, hang up;
    ``length=False``: no Content-Length (HTTP/1.0: the body ends when the connection closes)."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body if cut is None else body[:cut])
    handler.wfile.flush()
    handler.close_connection = True


def not_found(handler: BaseHTTPRequestHandler) -> None:
    send(handler, 404, NOT_FOUND.encode(), "text/html")


def serve_file(body: bytes, ranges: bool = True, cut: int | None = None,
               length: bool = True) -> Callable[[BaseHTTPRequestHandler], None]:
    """The file, honouring ``Range: bytes=N-`` (206) unless ``ranges`` is False; ``cut`` truncates
    a whole-file answer, ``length=False`` leaves its Content-Length out."""

    def handle(handler: BaseHTTPRequestHandler) -> None:
        asked = handler.headers.get("Range")
        if asked and ranges:
            start = int(asked.split("=")[1].rstrip("-"))
            send(handler, 206, body[start:], "application/octet-stream",
                 {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
        else:
            send(handler, 200, body, "application/octet-stream", cut=cut, length=length)

    return handle


def serve_text(text: str, content_type: str = "text/html; charset=utf-8") -> Callable[[BaseHTTPRequestHandler], None]:
    return lambda handler: send(handler, 200, text.encode(), content_type)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Server]:
    """The loopback server, the registry pointed at it, the files in a fresh HPSEG_HOME."""
    served = Server()
    monkeypatch.setenv("HPSEG_RELEASED_MIRROR", served.base)
    monkeypatch.setenv("HPSEG_HOME", str(tmp_path / "home"))
    yield served
    served.close()


def _cached() -> Path:
    return released_path(get_released(NAME))


def _image(seed: int = 0, size: tuple[int, int] = (24, 40)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------- the registry


def test_registry_lists_the_three_released_models_with_their_datasets_and_backbones() -> None:
    models = {model.name: model for model in list_released()}
    assert set(models) == {"hp/cocostuff27-vits8", "hp/cityscapes27-vits8", "hp/cityscapes27-vitb8"}
    coco, city_s, city_b = models["hp/cocostuff27-vits8"], models["hp/cityscapes27-vits8"], models["hp/cityscapes27-vitb8"]
    assert coco.class_names == load_cocostuff27_mapping()[1] and coco.n_classes == 27
    assert city_s.class_names == CITYSCAPES27_CLASS_NAMES == city_b.class_names
    assert len(set(coco.colours)) == 27
    # The paper's ViT-S/8 is DINO's 300-epoch file; ViT-B/8 DINO's only one (the backbone registry's).
    assert coco.dino_weights.endswith("dino_deitsmall8_300ep_pretrain.pth")
    assert city_b.dino_weights.endswith("dino_vitbase8_pretrain.pth")
    assert dict(coco.paper.items()) == {"unsupervised_accuracy": 57.2, "unsupervised_miou": 24.6,
                                        "linear_accuracy": 75.6, "linear_miou": 42.7}
    assert city_b.paper.items() == [] and "no Cityscapes number" in city_b.paper.note
    assert dict(city_s.paper.items()) == {"unsupervised_accuracy": 79.5, "unsupervised_miou": 18.4}
    assert all(model.page_url.startswith("https://drive.google.com/file/d/") for model in models.values())


def test_names_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_released_name(NAME) and not is_released_name("hp/nothing") and not is_released_name("run/last.pt")
    assert released_source(NAME) is get_released(NAME)
    with pytest.raises(ReleasedModelError, match="hp/cocostuff27-vits8, hp/cityscapes27-vits8"):
        get_released("hp/coco")
    # A file on disk of that name is not shadowed by the registry.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hp").mkdir()
    (tmp_path / "hp" / "cocostuff27-vits8").write_bytes(b"x")
    assert released_source(NAME) is None


def test_offline_error_names_the_url_the_cache_path_and_the_hand_placement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HPSEG_HOME", str(tmp_path))
    monkeypatch.delenv("HPSEG_RELEASED_MIRROR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Image.fromarray(_image()).save(tmp_path / "photo.png")
    assert main(["predict", str(tmp_path / "photo.png"), "--model", NAME, "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and message.startswith("hpseg predict: error: ")
    assert "offline" in message and "https://drive.google.com/uc?export=download&id=1ugF4s4yvLSCQH967BKjyYVFX5G4pRktP" in message
    assert str(tmp_path / "released" / FILE) in message and "--checkpoint FILE" in message


# ---------------------------------------------------------------------------------------- the whole path


def test_name_downloads_verifies_converts_and_segments_with_the_linear_head(server: Server, tmp_path: Path,
                                                                           notices: Notices) -> None:
    server.routes[f"/{FILE}"] = serve_file(BODY)
    segmenter = hpseg.load(NAME, device="cpu", size=0, window=0)
    # Said once each: the linear head by default; a file whose backbone is not the registry's (the tiny test ViT).
    assert any("segments with the linear head by default" in m for m in notices.messages)
    assert any("holds a vit_tiny_p8 backbone, not the dino_vits8" in m for m in notices.messages)
    path = _cached()
    assert path.read_bytes() == BODY and not path.with_name(FILE + ".part").exists()
    record = json.loads(path.with_name(FILE + ".sha256.json").read_text())
    assert record["sha256"] == SHA and record["size"] == len(BODY) and record["source"] == f"{server.base}/{FILE}"
    # The linear head by default: the dataset's classes, as the authors' linear probe gives them.
    assert segmenter.default_head == "linear" and segmenter.class_names == load_cocostuff27_mapping()[1]
    assert segmenter.label_names() == segmenter.class_names
    assert segmenter.label_names("cluster") == [f"cluster {k}" for k in range(N_CLASSES)]
    image = _image()
    by_name = segmenter.segment(image)
    direct = tmp_path / "direct.pth"
    direct.write_bytes(BODY)
    assert np.array_equal(by_name, hpseg.load(direct, device="cpu", size=0, window=0).segment(image, head="linear"))
    assert by_name.min() >= 0 and by_name.max() < N_CLASSES
    # Cached and verified from now on: no second request.
    hpseg.load(NAME, device="cpu")
    assert len(server.requests) == 1


def test_drive_confirmation_page_for_a_large_file_is_followed(server: Server) -> None:
    server.routes[f"/{FILE}"] = serve_text(CONFIRMATION.format(base=server.base, file=FILE))
    confirmed: list[dict[str, list[str]]] = []

    def download(handler: BaseHTTPRequestHandler) -> None:
        confirmed.append(urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query))
        serve_file(BODY)(handler)

    server.routes["/download"] = download
    assert fetch_released(NAME).read_bytes() == BODY
    assert [path.split("?")[0] for path, _ in server.requests] == [f"/{FILE}", "/download"]
    assert confirmed == [{"id": [FILE], "export": ["download"], "confirm": ["t"], "uuid": ["4f2c"]}]


def test_drive_quota_page_is_recognised_and_named(server: Server) -> None:
    server.routes[f"/{FILE}"] = serve_text(QUOTA)
    with pytest.raises(ReleasedModelError) as error:
        fetch_released(NAME)
    message = str(error.value)
    assert "Google Drive refused the download" in message and "Too many users have viewed" in message
    assert "quota" in message and "drive.google.com/file/d/" in message and str(_cached()) in message
    assert not _cached().exists() and not _cached().with_name(FILE + ".part").exists()


@pytest.mark.parametrize("content_type", ["text/html", "application/octet-stream"])
def test_html_error_page_instead_of_the_checkpoint_is_refused(server: Server, content_type: str) -> None:
    """Labelled as HTML or not (a mirror answering 200 with an error page), it is named, never kept."""
    server.routes[f"/{FILE}"] = serve_text(NOT_FOUND, content_type)
    with pytest.raises(ReleasedModelError, match=r"sent an HTML page \('404 Not Found'\) instead of the checkpoint"):
        fetch_released(NAME)
    assert not _cached().exists() and not _cached().with_name(FILE + ".part").exists()


def test_http_error_is_one_line_with_the_url(server: Server) -> None:
    with pytest.raises(ReleasedModelError, match=rf"{server.base}/{FILE} answered HTTP 404"):
        fetch_released(NAME)


def test_truncated_download_is_kept_refused_and_resumed_with_a_range(server: Server) -> None:
    cut = len(BODY) // 3
    server.routes[f"/{FILE}"] = serve_file(BODY, cut=cut, ranges=False)
    with pytest.raises(ReleasedModelError, match=rf"stopped after {cut:,} of {len(BODY):,} bytes.*run the command again"):
        hpseg.load(NAME, device="cpu")
    part = _cached().with_name(FILE + ".part")
    assert not _cached().exists() and part.read_bytes() == BODY[:cut]
    server.routes[f"/{FILE}"] = serve_file(BODY)
    assert fetch_released(NAME).read_bytes() == BODY
    assert server.requests[-1][1] == f"bytes={cut}-" and not part.exists()


def test_truncated_archive_without_a_length_is_kept_refused_and_resumed(server: Server) -> None:
    cut = len(BODY) // 2
    server.routes[f"/{FILE}"] = serve_file(BODY, cut=cut, ranges=False, length=False)
    with pytest.raises(ReleasedModelError, match=rf"ended before the end of the archive \({cut:,} bytes"):
        fetch_released(NAME)
    assert not _cached().exists() and _cached().with_name(FILE + ".part").stat().st_size == cut
    server.routes[f"/{FILE}"] = serve_file(BODY)
    assert fetch_released(NAME).read_bytes() == BODY and server.requests[-1][1] == f"bytes={cut}-"


def test_a_file_that_is_not_a_checkpoint_is_deleted_and_refused(server: Server) -> None:
    server.routes[f"/{FILE}"] = serve_file(b"GIF89a" + bytes(200))
    with pytest.raises(ReleasedModelError, match=r"is not a PyTorch checkpoint \(it starts with b'GIF89a"):
        fetch_released(NAME)
    assert not _cached().exists() and not _cached().with_name(FILE + ".part").exists()


def test_confirmation_page_without_gdown_says_how_to_install_it(server: Server,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gdown.download", None)  # import fails: the extra is not installed
    server.routes[f"/{FILE}"] = serve_text(CONFIRMATION.format(base=server.base, file=FILE))
    with pytest.raises(ReleasedModelError, match=r"asks to confirm the download .* pip install 'hpseg\[download\]'"):
        fetch_released(NAME)


def test_server_ignoring_the_range_starts_the_part_over(server: Server) -> None:
    part = _cached().with_name(FILE + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes of another attempt")
    server.routes[f"/{FILE}"] = serve_file(BODY, ranges=False)
    assert fetch_released(NAME).read_bytes() == BODY
    assert server.requests[0][1] == "bytes=30-"


def test_changed_file_is_refused_with_both_hashes(server: Server) -> None:
    server.routes[f"/{FILE}"] = serve_file(BODY)
    path = fetch_released(NAME)
    damaged = bytearray(BODY)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(ReleasedModelError) as error:
        hpseg.load(NAME, device="cpu")
    message = str(error.value)
    assert SHA in message and hashlib.sha256(bytes(damaged)).hexdigest() in message and "refused" in message
    assert len(server.requests) == 1


def test_known_hash_is_checked_at_download(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = dataclasses.replace(get_released(NAME), sha256="0" * 64)
    monkeypatch.setattr(released, "_MODELS", (entry,))
    server.routes[f"/{FILE}"] = serve_file(BODY)
    with pytest.raises(ReleasedModelError, match=rf"has SHA-256 {SHA}, not the {'0' * 64}"):
        fetch_released(NAME)
    assert not _cached().exists()


def test_file_placed_by_hand_is_recorded_then_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPSEG_HOME", str(tmp_path))
    monkeypatch.delenv("HPSEG_RELEASED_MIRROR", raising=False)
    path = tmp_path / "released" / FILE
    path.parent.mkdir()
    path.write_bytes(BODY[:-100])  # an incomplete copy: refused
    with pytest.raises(ReleasedModelError, match="not a complete PyTorch checkpoint"):
        fetch_released(NAME)
    path.write_bytes(BODY)
    assert fetch_released(NAME) == path
    assert json.loads(path.with_name(FILE + ".sha256.json").read_text())["source"] == "placed by hand"


def test_cityscapes_model_gets_cityscapes_classes(server: Server) -> None:
    """27 classes would read as COCO-Stuff-27 without the registry's dataset."""
    server.routes["/hp_cityscapes27_vits8.pth"] = serve_file(BODY)
    segmenter = hpseg.load("hp/cityscapes27-vits8", device="cpu")
    assert segmenter.class_names == CITYSCAPES27_CLASS_NAMES and segmenter.default_head == "linear"


# ---------------------------------------------------------------------------------------- the commands


def test_predict_and_models_commands(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.routes[f"/{FILE}"] = serve_file(BODY)
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(2):
        Image.fromarray(_image(seed, (30, 20))).save(photos / f"p{seed}.png")
    assert main(["models"]) == 0
    assert "hp/cocostuff27-vits8   cocostuff27   dino_vits8  unknown  no" in capsys.readouterr().out
    out = tmp_path / "preds"
    assert main(["predict", str(photos), "--model", NAME, "--out", str(out), "--figure", "--no-progress"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["head"] == "linear" and summary["values"].startswith("class ids")
    assert [entry["name"] for entry in summary["labels"]] == load_cocostuff27_mapping()[1]
    labels = np.asarray(Image.open(out / "labels" / "p0.png"))
    assert labels.shape == (30, 20) and labels.max() < N_CLASSES
    assert main(["predict", str(photos), "--model", NAME, "--out", str(tmp_path / "clusters"), "--head", "cluster",
                 "--no-progress"]) == 0
    clusters = json.loads((tmp_path / "clusters" / "predictions.json").read_text())
    assert clusters["values"].startswith("cluster ids") and clusters["labels"][0]["name"] == "cluster 0"
    capsys.readouterr()
    assert main(["models"]) == 0
    size = f"{len(BODY) / 2**10:.0f} KiB"  # the tiny test checkpoint is under a MiB
    assert f"hp/cocostuff27-vits8   cocostuff27   dino_vits8  {size}" in capsys.readouterr().out
    assert "yes, verified" in "\n".join(line for line in _models_lines() if line.startswith(NAME))
    assert len(server.requests) == 1


def _models_lines() -> list[str]:
    from hpseg.checkpoints.released import format_released_table

    return format_released_table().splitlines()


def test_paper_comparison_sets_the_papers_numbers_beside_the_evaluation() -> None:
    text = paper_comparison(get_released(NAME), {"unsupervised_miou": 0.25, "linear_miou": 0.4},
                            crf=True)
    assert "paper  24.6   here  25.00" in text and "paper  42.7   here  40.00" in text
    assert "paper  57.2   here    n/a (*not checked against the PDF)" in text
    assert "reports no number" in paper_comparison(get_released("hp/cityscapes27-vitb8"), {}, crf=False)


def test_eval_by_name_sets_the_papers_numbers_beside_its_own(server: Server, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    server.routes[f"/{FILE}"] = serve_file(BODY)
    monkeypatch.chdir(tmp_path)  # a released model is evaluated into the current folder, not the cache
    root = make_coco(tmp_path / "cocostuff")
    assert main(["eval", NAME, "--data-root", str(root), "--device", "cpu", "--max-images", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "paper vs this evaluation (COCO-Stuff-27 table of the paper (with CRF); this evaluation without CRF)" in out
    assert not (_cached().parent / "eval-hp_cocostuff27_vits8").exists()
    results = json.loads((tmp_path / "eval-hp--cocostuff27-vits8" / "results.json").read_text())
    measured = 100 * results["hp"]["unsupervised_miou"]
    assert f"unsupervised miou        paper  24.6   here {measured:6.2f}" in out
    assert results["paper"]["model"] == NAME and results["paper"]["linear_miou"] == 42.7
    assert results["dataset"] == "cocostuff27" and results["crf"] is False


def test_app_takes_a_model_name_and_opens_on_the_linear_head(server: Server) -> None:
    from hpseg.cli.app import describe
    from hpseg.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["app", "--model", NAME]).checkpoint == NAME
    assert parser.parse_args(["predict", "x.png", "--model", NAME, "--out", "o"]).checkpoint == NAME
    with pytest.raises(SystemExit):
        parser.parse_args(["app", "--model", NAME, "--checkpoint", "x.pt"])
    server.routes[f"/{FILE}"] = serve_file(BODY)
    text = describe(hpseg.load(NAME, device="cpu"))
    assert f"**Checkpoint** `{NAME}`" in text and "**default head** `linear`" in text
