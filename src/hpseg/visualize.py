"""Colour palettes, label-map rendering, figure grids and confusion heatmaps.

The core needs only Pillow and numpy; :func:`confusion_image` uses matplotlib when it is
installed (``hpseg[viz]``) and otherwise draws the heatmap with Pillow.

Conventions:

* Label maps are ``(H, W)`` integer arrays. Negative ids and ``ignore_index`` (default 255)
  mean "ignore" and are drawn black; no class colour is black.
* :func:`palette` is prefix-stable (``palette(n)`` is the first ``n`` rows of ``palette(m)``,
  ``m > n``), so a class keeps its colour whatever the number of ids in a given image.
* Files are written atomically: to a temporary file in the destination directory, then
  ``os.replace``; a reader never sees a half-written PNG and a crash leaves no partial file.
* Confusion matrices follow :mod:`hpseg.evaluation.metrics`: rows = predictions, columns = true classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hpseg.errors import InvalidInputError
from hpseg.files import atomic_write

__all__ = [
    "colorize",
    "confusion_image",
    "figure_grid",
    "index_png",
    "legend",
    "overlay",
    "palette",
    "save_image_atomic",
    "segmentation_figure",
    "with_legend",
]

#: A legend entry: a name and its colour.
LegendEntry = tuple[str, tuple[int, int, int]]

IGNORE_INDEX = 255

# Hand-picked, high-contrast first colours (matplotlib's tab20, dark shades first, then a set of
# Cityscapes colours); later ids come from a bit-interleaved enumeration of the RGB cube.
_BASE_COLOURS = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
        (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
        (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (250, 170, 30), (220, 220, 0), (107, 142, 35), (70, 130, 180), (0, 0, 230),
        (119, 11, 32), (0, 80, 100),
    ],
    dtype=np.uint8,
)  # fmt: skip


def _interleaved(i: int) -> tuple[int, int, int]:
    """The i-th colour of the PASCAL-VOC style bit interleaving (a bijection on 24 bits)."""
    r = g = b = 0
    for j in range(8):
        r |= ((i >> (3 * j)) & 1) << (7 - j)
        g |= ((i >> (3 * j + 1)) & 1) << (7 - j)
        b |= ((i >> (3 * j + 2)) & 1) << (7 - j)
    return r, g, b


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 distinct, non-black colours; deterministic and prefix-stable.

    Valid for ``n < 2**24``; black is reserved for ignored pixels.
    """
    if n < 0 or n >= 2**24:
        raise ValueError(f"palette size must be in [0, 2**24), got {n}")
    colours = [tuple(int(v) for v in c) for c in _BASE_COLOURS[:n]]
    used = set(colours)
    i = 1  # 0 maps to black
    while len(colours) < n:
        c = _interleaved(i)
        i += 1
        if c not in used:  # skip colours already taken by the hand-picked table
            used.add(c)
            colours.append(c)
    return np.array(colours, dtype=np.uint8).reshape(n, 3)


def _as_label_map(label_map: np.ndarray) -> np.ndarray:
    if hasattr(label_map, "detach"):  # torch tensor (possibly CUDA), without importing torch
        arr = label_map.detach().cpu().numpy()  # type: ignore[union-attr]
    else:
        arr = np.asarray(label_map)
    if arr.ndim != 2:
        raise ValueError(f"label map must be (H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"label map must be integer, got {arr.dtype}")
    return arr.astype(np.int64)


def _valid_mask(ids: np.ndarray, ignore_index: int | None) -> np.ndarray:
    valid = ids >= 0
    if ignore_index is not None:
        valid &= ids != ignore_index
    return valid


def colorize(
    label_map: np.ndarray, colors: np.ndarray | None = None, ignore_index: int | None = IGNORE_INDEX
) -> Image.Image:
    """Render an ``(H, W)`` integer label map as an RGB image.

    Args:
        label_map: class / cluster ids; negatives and ``ignore_index`` are drawn black.
        colors: ``(n, 3)`` uint8 palette to use; default :func:`palette` sized to the ids.
        ignore_index: extra id drawn black (None: only negatives are ignored).
    """
    ids = _as_label_map(label_map)
    valid = _valid_mask(ids, ignore_index)
    top = int(ids[valid].max()) + 1 if valid.any() else 0
    table = palette(top) if colors is None else np.asarray(colors, dtype=np.uint8)
    if top > len(table):
        raise ValueError(f"label map has id {top - 1} but the palette has {len(table)} colours")
    rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
    rgb[valid] = table[ids[valid]]
    return Image.fromarray(rgb, mode="RGB")


def _format_for(path: str | os.PathLike[str]) -> str:
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise InvalidInputError(f"cannot tell the image format of {str(path)!r} from its extension")
    return fmt


def save_image_atomic(img: Image.Image, path: str | os.PathLike[str]) -> None:
    """Save ``img`` to ``path`` (format from the extension) via a temp file and ``os.replace``.

    Creates missing parent directories.
    """
    fmt = _format_for(path)
    with atomic_write(path) as fh:
        img.save(fh, format=fmt)


def index_png(
    label_map: np.ndarray, path: str | os.PathLike[str], ignore_index: int | None = IGNORE_INDEX
) -> None:
    """Write ``label_map`` as a palette ("P" mode) PNG, atomically.

    Pixel values are the ids themselves, so ``np.array(Image.open(path))`` gives them back;
    ids must lie in ``[0, 255]`` and negative ids (ignore) are stored as 255. Ids get their
    :func:`palette` colour; ``ignore_index`` (255) is black.
    """
    ids = _as_label_map(label_map)
    ids = np.where(ids < 0, IGNORE_INDEX, ids)
    if ids.size and int(ids.max()) > 255:
        raise ValueError(f"index PNG holds ids 0..255, got {int(ids.max())}")
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:255] = palette(255)
    if ignore_index is None:
        colours[255] = palette(256)[255]
    elif 0 <= ignore_index <= 255:
        colours[ignore_index] = 0
    img = Image.fromarray(ids.astype(np.uint8), mode="P")
    img.putpalette(colours.reshape(-1).tolist())
    with atomic_write(path) as fh:
        img.save(fh, format="PNG")


def _as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 3:
        if arr.dtype != np.uint8:
            # Floats are taken as [0, 1] images.
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(arr, mode="RGB")
    raise ValueError(f"image must be a PIL image or an (H, W, 3) array, got shape {arr.shape}")


def overlay(
    image: Image.Image | np.ndarray,
    label_map: np.ndarray,
    alpha: float = 0.5,
    ignore_index: int | None = IGNORE_INDEX,
) -> Image.Image:
    """Blend the colourised ``label_map`` over ``image`` (RGB, the image's size).

    The label map is resized (nearest) to the image when sizes differ; ignored pixels keep the
    original image rather than being darkened.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = _as_rgb(image)
    ids = _as_label_map(label_map)
    colour = colorize(ids, ignore_index=ignore_index)
    valid = Image.fromarray((_valid_mask(ids, ignore_index) * 255).astype(np.uint8), mode="L")
    if colour.size != base.size:
        colour = colour.resize(base.size, Image.Resampling.NEAREST)
        valid = valid.resize(base.size, Image.Resampling.NEAREST)
    blended = Image.blend(base, colour, alpha)
    return Image.composite(blended, base, valid)


def _cell_image(item: Image.Image | np.ndarray | None, cell: int) -> Image.Image | None:
    """Fit ``item`` into a ``cell x cell`` box, keeping its aspect ratio."""
    if item is None:
        return None
    if isinstance(item, Image.Image):
        img, resample = item.convert("RGB"), Image.Resampling.BILINEAR
    else:
        arr = np.asarray(item)
        if arr.ndim == 2:
            # Label maps: colourise and resize with nearest so no blended colours appear.
            img, resample = colorize(arr), Image.Resampling.NEAREST
        else:
            img, resample = _as_rgb(arr), Image.Resampling.BILINEAR
    w, h = img.size
    scale = cell / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, resample)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType (>= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def figure_grid(
    rows: Sequence[Sequence[Image.Image | np.ndarray | None]],
    titles: Sequence[str] | None = None,
    cell: int = 160,
    *,
    pad: int = 4,
    title_height: int = 22,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile images into a grid, e.g. image | ground truth | baseline | HP per row.

    Args:
        rows: rows of cells; a cell is a PIL image, an ``(H, W, 3)`` array, an ``(H, W)``
            integer label map (colourised) or None (left blank). Rows may differ in length.
        titles: optional column titles drawn above the first row.
        cell: each cell is fit (aspect kept, centred) into ``cell x cell`` pixels; a column is as
            wide as its widest fitted cell and a row as tall as its tallest, so landscape or
            portrait images leave no blank margins (an empty column or row keeps ``cell``).
        pad: gap between and around cells.

    Returns:
        RGB image of width ``sum(column widths) + (n_cols + 1) * pad`` and height
        ``sum(row heights) + (n_rows + 1) * pad`` (+ ``title_height`` with titles): for square
        images ``n_cols * cell + (n_cols + 1) * pad`` by ``n_rows * cell + (n_rows + 1) * pad``.
    """
    n_rows = len(rows)
    n_cols = max([len(r) for r in rows] + [len(titles) if titles else 0])
    if n_rows == 0 or n_cols == 0:
        raise ValueError("figure_grid needs at least one cell")
    cells = [[_cell_image(item, cell) for item in row] for row in rows]
    widths = [max((r[j].width for r in cells if j < len(r) and r[j] is not None), default=cell) for j in range(n_cols)]
    heights = [max((img.height for img in r if img is not None), default=cell) for r in cells]
    lefts = [pad + sum(widths[:j]) + j * pad for j in range(n_cols)]
    top = title_height if titles else 0
    tops = [top + pad + sum(heights[:i]) + i * pad for i in range(n_rows)]
    canvas = Image.new("RGB", (sum(widths) + (n_cols + 1) * pad, top + sum(heights) + (n_rows + 1) * pad), background)
    draw = ImageDraw.Draw(canvas)
    if titles:
        font = _font(max(8, title_height - 8))
        for j, title in enumerate(titles):
            draw.text((lefts[j] + widths[j] // 2, top // 2), str(title), fill=(0, 0, 0), font=font, anchor="mm")
    for i, row in enumerate(cells):
        for j, img in enumerate(row):
            if img is not None:
                canvas.paste(img, (lefts[j] + (widths[j] - img.width) // 2, tops[i] + (heights[i] - img.height) // 2))
    return canvas


def legend(entries: Sequence[LegendEntry], width: int) -> Image.Image:
    """A white strip with one coloured square and name per entry, wrapped to ``width`` pixels."""
    font = _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box, gap, line, margin = 14, 16, 22, 8
    x, y, placed = margin, 6, []
    for name, colour in entries:
        w = box + 6 + int(probe.textlength(name, font=font))
        if x > margin and x + w > width - margin:
            x, y = margin, y + line
        placed.append((x, y, name, colour))
        x += w + gap
    strip = Image.new("RGB", (width, y + line + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, name, colour in placed:
        draw.rectangle([x, y + 2, x + box, y + 2 + box], fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((x + box + 6, y + 2 + box // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return strip


def with_legend(image: Image.Image, entries: Sequence[LegendEntry]) -> Image.Image:
    """``image`` with :func:`legend` of ``entries`` below it, as wide as the image."""
    strip = legend(entries, image.width)
    out = Image.new("RGB", (image.width, image.height + strip.height), (255, 255, 255))
    out.paste(image, (0, 0))
    out.paste(strip, (0, image.height))
    return out


def segmentation_figure(image: Image.Image | np.ndarray, labels: np.ndarray, names: Sequence[str],
                        cell: int = 384) -> Image.Image:
    """image | segmentation side by side, with a legend of the labels present (``names[id]``;
    negative ids and :data:`IGNORE_INDEX` are "unmatched / ignored", drawn black)."""
    grid = figure_grid([[image, labels]], titles=["image", "segmentation"], cell=cell)
    return with_legend(grid, label_entries(labels, names))


def label_entries(labels: np.ndarray, names: Sequence[str]) -> list[LegendEntry]:
    """The :func:`legend` entries of the labels present in ``labels`` (``names[id]`` in the
    palette's colours; negative ids and :data:`IGNORE_INDEX` as one black "unmatched / ignored")."""
    present = [int(v) for v in np.unique(labels) if 0 <= v < IGNORE_INDEX]
    colours = palette(max(present) + 1) if present else np.zeros((0, 3), np.uint8)
    entries = [(names[v] if v < len(names) else f"id {v}", tuple(int(c) for c in colours[v])) for v in present]
    if (labels < 0).any() or (labels == IGNORE_INDEX).any():
        entries.append(("unmatched / ignored", (0, 0, 0)))
    return entries


def _normalise_confusion(conf: np.ndarray, normalize: str | None) -> np.ndarray:
    """``conf`` is (true, pred) here; returns floats normalised as requested."""
    m = conf.astype(np.float64)
    if normalize in (None, "none"):
        return m
    if normalize == "true":
        denom = m.sum(axis=1, keepdims=True)
    elif normalize == "pred":
        denom = m.sum(axis=0, keepdims=True)
    elif normalize == "all":
        denom = np.array(m.sum())
    else:
        raise ValueError(f"normalize must be 'true', 'pred', 'all' or None, got {normalize!r}")
    return np.divide(m, denom, out=np.zeros_like(m), where=denom > 0)


def _confusion_matplotlib(m: np.ndarray, names: Sequence[str], title: str, normalized: bool) -> Image.Image:
    # Lazy: matplotlib is the optional ``hpseg[viz]`` extra (the caller falls back to Pillow
    # without it) and costs a second to import. Figure + Agg canvas directly: no pyplot global
    # state, no dependence on the active backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(names)
    side = max(4.0, 0.32 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalized else None, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(names), rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels=list(names), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy(), mode="RGB")


def _confusion_pil(m: np.ndarray, names: Sequence[str], title: str, cell: int = 18) -> Image.Image:
    k = len(names)
    font = _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([int(probe.textlength(str(n), font=font)) for n in names] + [10]) + 8
    title_h = 24 if title else 4
    width = label_w + k * cell + 8
    height = title_h + label_w + k * cell + 8
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((width // 2, title_h // 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    x0, y0 = label_w, title_h + label_w
    # The empty top-left corner says which axis is which.
    draw.text((4, y0 - 30), "rows: truth", fill=(90, 90, 90), font=font)
    draw.text((4, y0 - 16), "cols: pred", fill=(90, 90, 90), font=font)
    peak = float(m.max()) if m.size and m.max() > 0 else 1.0
    for r in range(k):
        for c in range(k):
            v = float(m[r, c]) / peak
            # White -> dark blue ramp, like matplotlib's "Blues".
            colour = (int(247 - 239 * v), int(251 - 203 * v), int(255 - 148 * v))
            draw.rectangle([x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1],
                           fill=colour)  # fmt: skip
    for i, name in enumerate(names):
        draw.text((x0 - 4, y0 + i * cell + cell // 2), str(name), fill=(0, 0, 0), font=font, anchor="rm")
        # Column labels: draw horizontally on a strip, then rotate it upright.
        strip = Image.new("RGB", (label_w, cell), (255, 255, 255))
        ImageDraw.Draw(strip).text(
            (label_w - 4, cell // 2), str(name), fill=(0, 0, 0), font=font, anchor="rm"
        )
        img.paste(strip.rotate(90, expand=True), (x0 + i * cell, title_h))
    return img


def confusion_image(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    normalize: str | None = "true",
    *,
    title: str = "",
    backend: str = "auto",
) -> None:
    """Write a confusion-matrix heatmap PNG atomically.

    Args:
        confusion: ``(K, K)`` counts with rows = predicted class, columns = true class (as in
            ``SegmentationMetrics.compute()["confusion"]``). It is drawn transposed, in the
            usual layout: ground truth on the y axis, prediction on the x axis.
        class_names: ``K`` names.
        path: output PNG path.
        normalize: ``"true"`` (each ground-truth row sums to 1), ``"pred"``, ``"all"`` or None.
        backend: ``"matplotlib"``, ``"pil"`` or ``"auto"`` (matplotlib when importable).
    """
    if hasattr(confusion, "detach"):
        conf = confusion.detach().cpu().numpy()  # type: ignore[union-attr]
    else:
        conf = np.asarray(confusion)
    k = len(class_names)
    if conf.shape != (k, k):
        raise ValueError(f"confusion must be ({k}, {k}) to match class_names, got {conf.shape}")
    m = _normalise_confusion(conf.T, normalize)
    if backend not in ("auto", "matplotlib", "pil"):
        raise ValueError(f"backend must be 'auto', 'matplotlib' or 'pil', got {backend!r}")
    img = None
    if backend in ("auto", "matplotlib"):
        try:
            img = _confusion_matplotlib(m, class_names, title, normalize not in (None, "none"))
        except ImportError:
            if backend == "matplotlib":
                raise
    if img is None:
        img = _confusion_pil(m, class_names, title)
    with atomic_write(path) as fh:
        img.save(fh, format="PNG")
