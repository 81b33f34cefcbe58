"""Tests of hpseg.visualize: palette, index PNG round trip, overlay/grid sizes, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hpseg import visualize
from hpseg.visualize import (
    colorize,
    confusion_image,
    figure_grid,
    index_png,
    legend,
    overlay,
    palette,
    save_image_atomic,
    segmentation_figure,
    with_legend,
)


def _leftovers(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_palette_distinct_deterministic_prefix_stable():
    p = palette(300)
    assert p.shape == (300, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p.tolist()}) == 300
    assert not (p == 0).all(axis=1).any()  # black is reserved for ignore
    assert np.array_equal(palette(300), p)
    assert np.array_equal(palette(27), p[:27])
    assert palette(0).shape == (0, 3)


def test_colorize_ignore_black_and_colours():
    ids = np.array([[0, 1, 2], [-1, 255, 1]])
    rgb = np.asarray(colorize(ids))
    assert rgb.shape == (2, 3, 3)
    p = palette(3)
    assert (rgb[0] == p[[0, 1, 2]]).all() and (rgb[1, 2] == p[1]).all()
    assert (rgb[1, :2] == 0).all()


def test_index_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 27, size=(23, 31))
    ids[0, :5] = -1  # ignore: stored as 255
    ids[1, 0] = 254
    path = tmp_path / "sub" / "pred.png"
    index_png(ids, path)
    with Image.open(path) as img:
        assert img.mode == "P"
        back = np.array(img)
        colours = np.array(img.getpalette()[: 256 * 3], dtype=np.uint8).reshape(256, 3)
    assert np.array_equal(back, np.where(ids < 0, 255, ids))
    assert np.array_equal(colours[:27], palette(27))
    assert (colours[255] == 0).all()
    assert _leftovers(path.parent) == []
    with pytest.raises(ValueError):
        index_png(np.array([[256]]), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_overlay_size_and_blend():
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    label = np.zeros((10, 15), dtype=np.int64)
    label[:, :5] = -1  # ignored: left third keeps the image
    out = overlay(image, label, alpha=0.5)
    assert out.size == (30, 20) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    assert (arr[:, :10] == 100).all()
    expected = (100 + palette(1)[0].astype(int)) / 2
    assert np.abs(arr[:, 10:] - expected).max() <= 1
    assert np.asarray(overlay(Image.fromarray(image), label, alpha=0.0)).max() == 100


def test_figure_grid_size():
    img = Image.new("RGB", (64, 48), (10, 20, 30))
    label = np.arange(12).reshape(3, 4)
    rows = [[img, label, np.zeros((8, 8, 3), dtype=np.uint8)], [img, None]]
    grid = figure_grid(rows, titles=["image", "ground truth", "HP"], cell=40)
    pad, title_h = 4, 22
    # Each 4:3 cell fits as 40x30, the square one as 40x40: row 0 is 40 tall (its square), row 1 30.
    assert grid.size == (3 * 40 + 4 * pad, title_h + 40 + 30 + 3 * pad)
    assert figure_grid(rows, cell=40).size == (3 * 40 + 4 * pad, 40 + 30 + 3 * pad)
    square = [[np.zeros((8, 8, 3), dtype=np.uint8)] * 2] * 3
    assert figure_grid(square, cell=40).size == (2 * 40 + 3 * pad, 3 * 40 + 4 * pad)
    # in the square row the 64x48 image (40x30) is centred vertically: 5 px of background above it
    arr = np.asarray(figure_grid(rows, cell=40))
    assert (arr[pad + 5 + 15, pad + 20] == (10, 20, 30)).all()
    assert (arr[pad + 1, pad + 20] == 255).all()


def test_figure_of_a_landscape_image_has_no_blank_margins():
    """A 4:1 panorama: the figure is as tall as the fitted image, not as the square cell."""
    image = np.full((50, 200, 3), 90, np.uint8)
    labels = np.zeros((50, 200), np.int64)
    pad = 4
    grid = figure_grid([[image, labels]], cell=384)
    assert grid.size == (2 * 384 + 3 * pad, 96 + 2 * pad)
    inside = np.asarray(grid)[pad:pad + 96, pad:pad + 384]
    assert (inside == 90).all()  # the image fills its cell: no white band above or below
    portrait = figure_grid([[image.transpose(1, 0, 2)]], cell=384)
    assert portrait.size == (96 + 2 * pad, 384 + 2 * pad)


def test_legend_squares_wrap_and_sit_below_the_image():
    red, green = (200, 0, 0), (0, 150, 0)
    strip = np.asarray(legend([("road", red), ("tree", green)], width=400))
    # Square k: 14 px from x = 8 (first) at y = 8..22 (6 px top margin + 2), outlined in black.
    assert (strip[15, 15] == red).all() and (strip[8, 8] == 0).all() and (strip[15, 4] == 255).all()
    one_line = strip.shape[0]
    narrow = legend([("road", red), ("tree", green)], width=60)  # no room for two: a second line
    assert narrow.height == one_line + 22 and (np.asarray(narrow)[15 + 22, 15] == green).all()
    image = Image.new("RGB", (400, 30), (1, 2, 3))
    combined = with_legend(image, [("road", red)])
    assert combined.size == (400, 30 + one_line) and combined.getpixel((5, 5)) == (1, 2, 3)
    assert combined.getpixel((15, 30 + 15)) == red


def test_segmentation_figure_lists_the_labels_present():
    labels = np.array([[0, 2], [2, 255]])
    figure = segmentation_figure(np.zeros((2, 2, 3), np.uint8), labels, ["sky", "road", "tree"], cell=200)
    colours = palette(3)
    # image | segmentation (2 cells of 200 px, 4 px gaps, 22 px titles), then a one-line legend:
    # the squares of sky, tree and of "unmatched / ignored" (black), not of the absent road.
    grid_height = 22 + 200 + 2 * 4
    row = np.asarray(figure)[grid_height + 15]
    squares = [tuple(int(v) for v in pixel) for pixel in row if tuple(pixel) not in ((255, 255, 255), (0, 0, 0))]
    assert tuple(colours[0]) in squares and tuple(colours[2]) in squares and tuple(colours[1]) not in squares
    assert figure.height == grid_height + legend([("x", (0, 0, 0))], figure.width).height  # one line
    assert (row == 0).all(axis=1).sum() >= 14  # the black square's inside, 14 px wide


@pytest.mark.parametrize("backend", ["pil", "matplotlib"])
def test_confusion_image(tmp_path, backend):
    if backend == "matplotlib":
        pytest.importorskip("matplotlib")
    conf = np.array([[5, 1, 0], [0, 3, 0], [2, 0, 9]])
    path = tmp_path / f"confusion_{backend}.png"
    confusion_image(conf, ["a", "bb", "ccc"], path, backend=backend, title="t")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 50 and img.height > 50
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError):
        confusion_image(conf, ["a", "b"], tmp_path / "x.png")


def test_normalise_true_rows_are_ground_truth():
    conf = np.array([[2, 1], [2, 3]])  # rows = prediction, columns = truth
    m = visualize._normalise_confusion(conf.T, "true")
    assert np.allclose(m.sum(axis=1), 1.0)
    assert np.allclose(m[0], [0.5, 0.5]) and np.allclose(m[1], [0.25, 0.75])


def test_save_image_atomic_no_temp_left(tmp_path, monkeypatch):
    img = Image.new("RGB", (5, 4), (1, 2, 3))
    path = tmp_path / "out.png"
    save_image_atomic(img, path)
    with Image.open(path) as back:
        assert back.size == (5, 4) and back.getpixel((0, 0)) == (1, 2, 3)
    assert _leftovers(tmp_path) == []
    save_image_atomic(img, tmp_path / "out.jpg")
    assert (tmp_path / "out.jpg").exists()
    with pytest.raises(ValueError, match="format"):
        save_image_atomic(img, tmp_path / "out.unknownext")

    # a failing save leaves the old file untouched and no temp file behind
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_image_atomic(Image.new("RGB", (9, 9)), path)
    monkeypatch.undo()
    with Image.open(path) as back:
        assert back.size == (5, 4)
    assert _leftovers(tmp_path) == []
