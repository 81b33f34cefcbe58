"""The web app: its segmenting function directly, and the page in headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hpseg
from hpseg.cli.app import segment_files

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def segmenter(tiny_run: Path) -> hpseg.Segmenter:
    return hpseg.load(tiny_run / "checkpoints" / "last.pt", device="cpu")


@pytest.fixture
def uploads(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for name, shape in [("a.png", (40, 56)), ("b.jpg", (64, 48))]:
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(tmp_path / name)
        files.append(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    return files + [tmp_path / "broken.png"]


def test_segment_files_panels_downloads_and_skips(segmenter: hpseg.Segmenter, uploads: list[Path],
                                                  tmp_path: Path) -> None:
    result = segment_files(segmenter, uploads, head="linear", opacity=0.7, out_dir=tmp_path / "out")
    assert len(result.panels) == 2 and "Segmented 2 image(s) with the linear head" in result.message
    assert "broken.png" in result.message and "not a readable image" in result.message
    labels = np.array(Image.open(tmp_path / "out" / "a.labels.png"))
    assert np.array_equal(labels, segmenter.segment(Image.open(uploads[0]), head="linear"))
    overlay = Image.open(tmp_path / "out" / "a.overlay.png")
    assert overlay.size == (56, 40)
    panel, caption = result.panels[0]
    assert caption == "a.png (linear head)" and panel.width > 2 * 256  # image | overlay, legend below
    assert sorted(Path(p).name for p in result.downloads) == ["a.labels.png", "a.overlay.png", "b.labels.png",
                                                              "b.overlay.png"]
    assert "Upload" in segment_files(segmenter, [], out_dir=tmp_path).message


def test_app_command_without_gradio_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from hpseg.cli.main import main

    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["app", "--checkpoint", "whatever.pt"]) == 2
    assert 'pip install "hpseg[app]"' in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rect(driver: object, element: object) -> dict[str, float]:
    """The element's box on the page (CSS pixels): top, bottom, width."""
    return driver.execute_script("const r = arguments[0].getBoundingClientRect(); "  # type: ignore[attr-defined]
                                 "return {top: r.top, bottom: r.bottom, width: r.width}", element)


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_app_in_headless_chromium(segmenter: hpseg.Segmenter, data_root: Path, tmp_path: Path) -> None:
    """Upload an image in a real browser, wait for the overlay, check it is hpseg's, screenshot."""
    photo = sorted((data_root / "val" / "images").glob("*.png"))[0]  # a validation image of the tiny run
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from hpseg.cli.app import serve

    port = _free_port()
    app = serve(segmenter, port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images input[type=file]"))
        assert "vit_tiny_p8" in driver.page_source  # the header names the backbone
        driver.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys(str(photo))
        wait.until(lambda d: photo.name in d.find_element(By.ID, "images").text.replace("\n", ""))
        driver.find_element(By.ID, "segment").click()
        images = wait.until(lambda d: [img for img in d.find_elements(By.CSS_SELECTOR, "#panels img")
                                       if d.execute_script("return arguments[0].naturalWidth", img) > 0])
        wait.until(lambda d: "Segmented 1 image(s)" in d.find_element(By.ID, "message").text)
        source = images[0].get_attribute("src")
        with urllib.request.urlopen(source, timeout=30) as response:  # noqa: S310 - our loopback server
            shown = np.array(Image.open(io.BytesIO(response.read())).convert("RGB"))
        expected = np.array(segment_files(segmenter, [photo], out_dir=tmp_path / "direct").panels[0][0])
        assert shown.shape == expected.shape and np.array_equal(shown, expected)
        time.sleep(0.5)  # let the gallery finish its layout before the screenshot
        # The panel is shown whole, legend included: the largest image lies inside the gallery's box.
        box = _rect(driver, driver.find_element(By.ID, "panels"))
        largest = max((_rect(driver, img) for img in driver.find_elements(By.CSS_SELECTOR, "#panels img")),
                      key=lambda rect: rect["width"])
        assert box["top"] <= largest["top"] and largest["bottom"] <= box["bottom"], (box, largest)
        shot = tmp_path / "app.png"
        assert driver.save_screenshot(str(shot)) and Image.open(shot).size[0] >= 1000
        if os.environ.get("HPSEG_APP_SCREENSHOT"):  # to refresh docs/app.png
            shutil.copy(shot, os.environ["HPSEG_APP_SCREENSHOT"])
    finally:
        driver.quit()
        app.close()
