"""``hpseg app``: a local web app (Gradio) to segment images with a trained checkpoint.

    hpseg app --checkpoint run/checkpoints/best.pt      # or a hub folder, or hf://owner/name
    hpseg app --model hp/cocostuff27-vits8              # a released model (`hpseg models`)

Upload or drop images (several at once), pick the head (cluster / linear), the CRF and the
overlay's opacity; each image comes back as image | overlay with a legend of the classes
present, and its label PNG (index PNG, as ``hpseg predict`` writes) and overlay can be
downloaded. :func:`segment_files` is the whole job, without the web page (tested directly).

An upload larger than :data:`MAX_SIDE` pixels on its longer side is downscaled to it before
segmenting, and the message says so (an 8000 x 8000 photo took a minute and 4 GiB: the label map,
overlay and PNGs at full size, not the backbone, cost that). Each request writes its downloads into
its own folder under one ``hpseg-app-*`` temporary folder (:class:`RequestFolders`): gradio copies
them into its cache when the request returns, older request folders go at the next request and
the whole folder when the app stops.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hpseg.data import ImageReadError, read_image
from hpseg.export import missing_extra
from hpseg.inference.segmenter import Segmenter, load
from hpseg.visualize import figure_grid, index_png, label_entries, overlay, save_image_atomic, with_legend

__all__ = ["MAX_SIDE", "AppResult", "RequestFolders", "build_app", "describe", "panel", "segment_files", "serve"]

#: Longest image side the app segments; larger uploads are downscaled to it first (and told so).
#: ``hpseg predict`` segments any size.
MAX_SIDE = 2048


@dataclass
class AppResult:
    """What one click returns: (panel image, caption) pairs, files to download, a message."""

    panels: list[tuple[Any, str]] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    message: str = ""


def describe(segmenter: Segmenter) -> str:
    """Markdown: which checkpoint, backbone and cluster->class mapping are in use."""
    mapping = segmenter.mapping_source or "none (the cluster head gives cluster ids)"
    default = (" · **default head** `linear` (a released model: the dataset's classes)"
               if segmenter.default_head == "linear" else "")
    return (f"**Checkpoint** `{segmenter.checkpoint}` · **backbone** `{segmenter.backbone.spec.name}` · "
            f"**mapping** `{mapping}` · {len(segmenter.class_names)} classes, {segmenter.n_clusters} clusters · "
            f"resize {segmenter.tiling.size or 'off'}, window {segmenter.tiling.window or 'whole image'}{default}")


def panel(image: Image.Image, overlaid: Image.Image, labels: np.ndarray, names: Sequence[str],
          cell: int = 320) -> Image.Image:
    """image | overlay side by side, with a legend of the labels present (hpseg's colours)."""
    grid = figure_grid([[image, overlaid]], titles=["image", "overlay"], cell=cell)
    return with_legend(grid, label_entries(labels, names))


def _unique_stem(path: Path, taken: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in taken:
        k, stem = k + 1, f"{path.stem}-{k}"
    taken.add(stem)
    return stem


class RequestFolders:
    """A new folder per request under one ``hpseg-app-*`` temporary folder; folders older than
    ``keep_s`` seconds (their files long copied by gradio) are removed when a request starts, the
    whole folder by :meth:`close` (or when the process exits)."""

    def __init__(self, keep_s: float = 300.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hpseg-app-"))
        self.keep_s = keep_s
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)

    def new(self) -> Path:
        cutoff = time.time() - self.keep_s
        for folder in self.root.iterdir():
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.root, prefix="request-"))

    def close(self) -> None:
        self._finalizer()


def _downscaled(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` with its longer side at most ``max_side`` pixels (aspect kept; antialiased)."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def segment_files(segmenter: Segmenter, files: Sequence[str | Path] | None, head: str = "cluster", crf: bool = False,
                  opacity: float = 0.5, *, out_dir: str | Path, max_side: int = MAX_SIDE) -> AppResult:
    """Segment uploaded files; unreadable ones are named in the message (by their own name, not
    the upload's temporary path), larger ones than ``max_side`` downscaled (and said), the others
    segmented.

    Writes ``<stem>.labels.png`` (index PNG: value = id, 255 = unmatched) and
    ``<stem>.overlay.png`` into ``out_dir`` for download.
    """
    result = AppResult()
    if not files:
        result.message = "Upload or drop one or more images, then press **Segment**."
        return result
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = segmenter.label_names(head)
    problems, notes, taken = [], [], set()
    for file in files:
        path = Path(file)
        try:
            image = read_image(path)
        except ImageReadError as error:
            reason = str(error).replace(str(path), path.name)  # the upload's temporary path means nothing to a user
            problems.append(f"- `{path.name}`: not a readable image ({reason})")
            continue
        if max(image.size) > max_side:
            original, image = image.size, _downscaled(image, max_side)
            notes.append(f"- `{path.name}`: {original[0]}×{original[1]} downscaled to {image.width}×{image.height} "
                         f"(the app's limit is {max_side} px; `hpseg predict` segments any size)")
        try:
            labels = segmenter.segment(image, head=head, crf=crf)
        except ImportError as error:  # the CRF extra is missing: say so once, segment nothing
            result.message = f"CRF unavailable: {error}"
            return result
        overlaid = overlay(image, labels, alpha=float(opacity))
        stem = _unique_stem(path, taken)
        index_png(labels, out / f"{stem}.labels.png")
        save_image_atomic(overlaid, out / f"{stem}.overlay.png")
        result.downloads += [str(out / f"{stem}.labels.png"), str(out / f"{stem}.overlay.png")]
        result.panels.append((panel(image, overlaid, labels, names), f"{path.name} ({head} head)"))
    done = f"Segmented {len(result.panels)} image(s) with the {head} head{' and the CRF' if crf else ''}."
    result.message = "\n".join([done] + (["Downscaled:"] + notes if notes else [])
                               + (["Skipped:"] + problems if problems else []))
    return result


def _import_gradio() -> Any:
    # Lazy, and only here: gradio is an optional extra and its import takes seconds.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no calls home
    try:
        import gradio
    except ImportError as error:
        raise missing_extra("app", "gradio", error) from None
    return gradio


def build_app(segmenter: Segmenter) -> Any:
    """The Gradio Blocks of the app for ``segmenter`` (not launched)."""
    gr = _import_gradio()
    folders = RequestFolders()

    def run(files: list[str] | None, head: str, crf: bool, opacity: float) -> tuple[Any, Any, str]:
        result = segment_files(segmenter, files, head, crf, opacity, out_dir=folders.new())
        # Opened on the first panel: the preview fits the whole panel (legend included) in the
        # gallery's height, where the grid's square cells would cut a wide panel's bottom off.
        shown = gr.Gallery(value=result.panels, selected_index=0 if result.panels else None)
        return shown, result.downloads or None, result.message

    with gr.Blocks(title="hpseg", analytics_enabled=False) as app:
        gr.Markdown("## hpseg — unsupervised semantic segmentation (HP)\n" + describe(segmenter))
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images (upload or drop, several at once)", file_count="multiple",
                                type="filepath", elem_id="images")
                head = gr.Radio(["cluster", "linear"], value=segmenter.default_head, label="Head", elem_id="head")
                crf = gr.Checkbox(False, label="Dense CRF (needs hpseg[crf])", elem_id="crf")
                opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                gallery = gr.Gallery(label="image | overlay | legend", columns=1, format="png", elem_id="panels",
                                     height=600, object_fit="contain", preview=True)
                downloads = gr.File(label="Label PNGs and overlays", file_count="multiple", elem_id="downloads")
        inputs, outputs = [files, head, crf, opacity], [gallery, downloads, message]
        button.click(run, inputs, outputs)
        for control in (head, crf):
            control.change(run, inputs, outputs)
        opacity.release(run, inputs, outputs)
    weakref.finalize(app, folders.close)
    return app


def serve(segmenter: Segmenter, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Launch the app on ``host:port`` (loopback by default: nothing is exposed to the network)."""
    gr = _import_gradio()
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts to fetch
    app = build_app(segmenter)
    # quiet: gradio's own lines ("Running on local URL", "set `share=True` in `launch()`") speak to
    # Python users; the command prints its URL itself.
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True,
               ssr_mode=False, theme=theme, share=False)
    return app


def run_cli(args: Any) -> int:
    """``hpseg app``."""
    _import_gradio()  # the install hint before loading a model
    segmenter = load(args.checkpoint, device=args.device, weights=args.weights,
                     mapping=None if args.no_mapping else (args.mapping or "auto"), size=args.size,
                     window=args.window)
    print(f"hpseg app: http://{args.host}:{args.port} ({describe(segmenter)})")
    serve(segmenter, args.host, args.port)
    return 0
