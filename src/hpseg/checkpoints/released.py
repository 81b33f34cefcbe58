"""The authors' released HP models, by name: ``hp/cocostuff27-vits8`` and the others below.

    hpseg models                                         # the list, and which are downloaded
    hpseg predict photos/ --model hp/cocostuff27-vits8 --out preds/
    segmenter = hpseg.load("hp/cocostuff27-vits8")

Each entry is a :class:`ReleasedModel`: where the authors host the checkpoint (the Google Drive
links of their README, github.com/hynnsk/HP), the dataset it was trained on (class names and
colours from hpseg's dataset tables), the backbone (a name of :mod:`hpseg.backbones.registry`,
which knows the official DINO file), the licence and the numbers the paper reports for it.

:func:`fetch_released` returns the verified local file, in the authors' format (converted in
memory by :mod:`hpseg.checkpoints.authors` when loaded):

* the file lives in ``$HPSEG_HOME/released/`` when ``HPSEG_HOME`` is set, else in torch.hub's
  checkpoint folder (``torch.hub.get_dir()/checkpoints``, where the DINO weights go too);
* it is downloaded on first use by :func:`hpseg.checkpoints.download.download_file` (progress
  bar, resume, Drive's confirmation step, atomic placement); offline (``HF_HUB_OFFLINE=1``, the
  switch hpseg's backbone weights follow too) nothing is downloaded and the error says where to
  put the file by hand;
* its SHA-256 is recorded beside it (``<file>.sha256.json``) at the first successful download --
  or at first use of a file placed there by hand -- and checked on every later load: a changed
  or damaged file is refused with both hashes.

The released files hold the frozen backbone's tensors too (the authors save their whole
featurizer), so running one needs no separate DINO download; the official DINO file is
recorded for provenance and its licence.

``HPSEG_RELEASED_MIRROR=URL`` fetches ``URL/<file name>`` instead of Google Drive (a mirror of
your own, and the loopback server of hpseg's tests); it is used even with ``HF_HUB_OFFLINE=1``,
being an address you chose.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from hpseg.backbones import get_spec
from hpseg.backbones.weights import offline_mode
from hpseg.checkpoints.download import DownloadError, download_file, file_sha256, is_torch_file
from hpseg.data import dataset_class_names
from hpseg.errors import HpsegError
from hpseg.files import write_json_atomic
from hpseg.visualize import palette

__all__ = [
    "PaperResults",
    "ReleasedModel",
    "ReleasedModelError",
    "fetch_released",
    "format_released_table",
    "get_released",
    "is_released_name",
    "list_released",
    "paper_comparison",
    "released_cache_dir",
    "released_path",
    "released_source",
    "released_url",
]

logger = logging.getLogger(__name__)

MIRROR_VARIABLE, HOME_VARIABLE = "HPSEG_RELEASED_MIRROR", "HPSEG_HOME"
_DRIVE_DOWNLOAD = "https://drive.google.com/uc?export=download&id={}"
_DRIVE_PAGE = "https://drive.google.com/file/d/{}/view"
_CODE_LICENCE = "MIT (github.com/hynnsk/HP, Copyright (c) 2023 Hyun Seok Seong)"


class ReleasedModelError(HpsegError, RuntimeError):
    """A released model cannot be had: unknown name, offline, download failed, file changed."""


@dataclass(frozen=True)
class PaperResults:
    """What the paper reports for a released model (percent, after the dense CRF, its Tables).

    A metric is None where the paper gives no number for this dataset and backbone;
    ``unchecked`` names the metrics not yet checked against the CVPR PDF (hpseg's spec marks
    them so): quote those as "as restated in hpseg's spec".
    """

    unsupervised_accuracy: float | None = None
    unsupervised_miou: float | None = None
    linear_accuracy: float | None = None
    linear_miou: float | None = None
    unchecked: tuple[str, ...] = ()
    note: str = ""

    def items(self) -> list[tuple[str, float]]:
        """(metric, value) of the numbers the paper gives, in the evaluation's order."""
        values = {"unsupervised_accuracy": self.unsupervised_accuracy, "unsupervised_miou": self.unsupervised_miou,
                  "linear_accuracy": self.linear_accuracy, "linear_miou": self.linear_miou}
        return [(key, value) for key, value in values.items() if value is not None]


@dataclass(frozen=True)
class ReleasedModel:
    """One released checkpoint.

    Attributes:
        name: hpseg's name, ``"hp/<dataset>-<backbone>"``.
        description: one line for tables.
        drive_id: the Google Drive file id of the authors' link.
        file_name: the local file's name in the cache.
        dataset: hpseg's dataset name (``"cocostuff27"``, ``"cityscapes27"``): classes and preset.
        backbone: the registered backbone it was trained on (its official DINO file:
            :attr:`dino_weights`).
        paper: the numbers the paper reports.
        licence: of the checkpoint (the authors' repository licence) and of the DINO weights.
        sha256: the file's known hash, checked at download; None where hpseg has not seen the
            file (the hash is then recorded at the first download and checked from then on).
        size_bytes: the file's size when known (None: not known before downloading).
    """

    name: str
    description: str
    drive_id: str
    file_name: str
    dataset: str
    backbone: str
    paper: PaperResults = field(default_factory=PaperResults)
    licence: str = f"checkpoint: {_CODE_LICENCE}; backbone: DINO weights, Apache-2.0 (facebookresearch/dino)"
    sha256: str | None = None
    size_bytes: int | None = None

    @property
    def page_url(self) -> str:
        """The authors' link (a Drive page for a browser)."""
        return _DRIVE_PAGE.format(self.drive_id)

    @property
    def class_names(self) -> list[str]:
        names = dataset_class_names(self.dataset)
        if names is None:
            raise ValueError(f"{self.name}: dataset {self.dataset!r} has no fixed class names")
        return names

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def colours(self) -> list[tuple[int, int, int]]:
        """The colour of each class in overlays and legends (:func:`hpseg.visualize.palette`)."""
        return [(int(r), int(g), int(b)) for r, g, b in palette(self.n_classes)]

    @property
    def dino_weights(self) -> str:
        """The official DINO file of the backbone (the backbone registry's)."""
        return get_spec(self.backbone).weights_url


_MODELS: tuple[ReleasedModel, ...] = (
    ReleasedModel(
        name="hp/cocostuff27-vits8", description="HP on COCO-Stuff-27, DINO ViT-S/8 (the paper's main model)",
        drive_id="1ugF4s4yvLSCQH967BKjyYVFX5G4pRktP", file_name="hp_cocostuff27_vits8.pth",
        dataset="cocostuff27", backbone="dino_vits8",
        paper=PaperResults(unsupervised_accuracy=57.2, unsupervised_miou=24.6, linear_accuracy=75.6,
                           linear_miou=42.7, unchecked=("unsupervised_accuracy", "linear_accuracy"),
                           note="COCO-Stuff-27 table of the paper (with CRF)"),
    ),
    ReleasedModel(
        name="hp/cityscapes27-vits8", description="HP on Cityscapes-27, DINO ViT-S/8",
        drive_id="1v3kRhRwx3CPOXXgwxOnDKhfjnskrV4bg", file_name="hp_cityscapes27_vits8.pth",
        dataset="cityscapes27", backbone="dino_vits8",
        paper=PaperResults(unsupervised_accuracy=79.5, unsupervised_miou=18.4, unchecked=("unsupervised_accuracy",),
                           note="Cityscapes-27 table of the paper (with CRF; hpseg's spec does not name its backbone, "
                                "hpseg's README gives ViT-S/8)"),
    ),
    ReleasedModel(
        name="hp/cityscapes27-vitb8", description="HP on Cityscapes-27, DINO ViT-B/8",
        drive_id="1rUQ-qcWw49_g-lp18URTiPdwuaU9lPHK", file_name="hp_cityscapes27_vitb8.pth",
        dataset="cityscapes27", backbone="dino_vitb8",
        paper=PaperResults(note="no Cityscapes number for ViT-B/8 in the paper's tables as restated in hpseg's "
                                "spec: measure it with `hpseg eval`"),
    ),
)


def list_released(models: tuple[ReleasedModel, ...] = _MODELS) -> list[ReleasedModel]:
    """The released models, in registry order."""
    return list(models)


def is_released_name(source: str | Path) -> bool:
    """Whether ``source`` is the name of a released model (``hp/...``)."""
    return str(source) in {model.name for model in _MODELS}


def get_released(name: str) -> ReleasedModel:
    """The released model ``name``; an unknown name raises ReleasedModelError listing the known ones."""
    for model in _MODELS:
        if model.name == name:
            return model
    known = ", ".join(model.name for model in _MODELS)
    raise ReleasedModelError(f"no released model is called {name!r}; the released models: {known} (`hpseg models`)")


def released_source(source: str | Path) -> ReleasedModel | None:
    """The released model ``source`` names, or None: a path (a local file or folder of that
    name wins over the name, so that nothing on disk is shadowed)."""
    if not is_released_name(source) or Path(source).exists():
        return None
    return get_released(str(source))


def released_cache_dir() -> Path:
    """``$HPSEG_HOME/released``, else torch.hub's checkpoint folder."""
    home = os.environ.get(HOME_VARIABLE)
    if home:
        return Path(home).expanduser() / "released"
    return Path(torch.hub.get_dir()) / "checkpoints"


def released_path(model: ReleasedModel) -> Path:
    """Where ``model``'s file is (or will be) kept."""
    return released_cache_dir() / model.file_name


def released_url(model: ReleasedModel) -> str:
    """Where ``model`` is downloaded from: ``$HPSEG_RELEASED_MIRROR/<file name>`` when set, else Drive."""
    mirror = os.environ.get(MIRROR_VARIABLE)
    if mirror:
        return f"{mirror.rstrip('/')}/{model.file_name}"
    return _DRIVE_DOWNLOAD.format(model.drive_id)


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _by_hand(model: ReleasedModel, path: Path) -> str:
    # By its class count alone a 27-class file reads as COCO-Stuff-27: name the dataset on conversion.
    passing = ("pass the file with --checkpoint FILE" if model.dataset == "cocostuff27" else
               f"convert the file with `hpseg import-checkpoint FILE --dataset {model.dataset} --out OUT.pt` and "
               "pass --checkpoint OUT.pt")
    return (f"download it in a browser from {model.page_url} and place it at {path} (hpseg checks it and records "
            f"its SHA-256 on first use), or {passing}")


def _record(model: ReleasedModel, path: Path, digest: str, how: str) -> None:
    write_json_atomic({"name": model.name, "file": path.name, "sha256": digest, "size": path.stat().st_size,
                       "source": how, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                      _record_path(path))


def _verified(model: ReleasedModel, path: Path) -> Path:
    """``path`` after checking it against its recorded SHA-256 (recording it for a file placed by hand)."""
    record = _record_path(path)
    digest = file_sha256(path)
    if not record.is_file():
        if not is_torch_file(path):
            raise ReleasedModelError(f"{path} (placed there for {model.name}) is not a complete PyTorch checkpoint; "
                                     f"delete it, then {_by_hand(model, path)}")
        if model.sha256 is not None and digest != model.sha256:
            raise ReleasedModelError(f"{path} has SHA-256 {digest}, but {model.name}'s file has {model.sha256}: "
                                     "another file, or a damaged one; delete it to download the model again")
        _record(model, path, digest, "placed by hand")
        logger.info("%s: recorded the SHA-256 %s of %s (placed by hand) in %s", model.name, digest, path, record)
        return path
    try:
        recorded = str(json.loads(record.read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ReleasedModelError(f"{record}: unreadable hash record ({error}); delete it and {path} to download "
                                 f"{model.name} again") from None
    if digest != recorded:
        raise ReleasedModelError(f"{path} has changed since it was downloaded: its SHA-256 is {digest}, {recorded} "
                                 f"was recorded in {record}; refused. Delete both files to download {model.name} again")
    return path


def fetch_released(name: str) -> Path:
    """The verified local file of the released model ``name`` (authors' format), downloaded on
    first use; see the module docstring. Raises ReleasedModelError with one line saying what to do."""
    model = get_released(name)
    path = released_path(model)
    if path.is_file():
        return _verified(model, path)
    url = released_url(model)
    if offline_mode() and not os.environ.get(MIRROR_VARIABLE):
        raise ReleasedModelError(f"{model.name} is not downloaded yet and hpseg is offline (HF_HUB_OFFLINE): it "
                                 f"comes from {url}; {_by_hand(model, path)}")
    logger.info("downloading %s (%s) from %s to %s", model.name, model.description, url, path)
    try:
        digest = download_file(url, path, expected_sha256=model.sha256, label=model.name)
    except DownloadError as error:
        raise ReleasedModelError(f"cannot download {model.name}: {error}. Or {_by_hand(model, path)}") from None
    _record(model, path, digest, url)
    logger.info("%s: downloaded to %s, SHA-256 %s recorded", model.name, path, digest)
    return path


def _size(model: ReleasedModel, path: Path) -> str:
    size = path.stat().st_size if path.is_file() else model.size_bytes
    if size is None:
        return "unknown"
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"


def _paper_line(paper: PaperResults) -> str:
    short = {"unsupervised_accuracy": "acc", "unsupervised_miou": "mIoU", "linear_accuracy": "linear acc",
             "linear_miou": "linear mIoU"}
    items = [f"{short[key]} {value:.1f}{'*' if key in paper.unchecked else ''}" for key, value in paper.items()]
    return ", ".join(items) if items else "none reported"


def format_released_table(models: list[ReleasedModel] | None = None) -> str:
    """Plain-text table of the released models (for ``hpseg models``)."""
    models = list_released() if models is None else models
    header = ("name", "dataset", "backbone", "size", "cached", "paper (CRF)")
    rows = []
    for model in models:
        path = released_path(model)
        cached = ("yes, verified" if _record_path(path).is_file() else "yes") if path.is_file() else "no"
        rows.append((model.name, model.dataset, model.backbone, _size(model, path), cached, _paper_line(model.paper)))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]

    notes = (f"files: {released_cache_dir()} (HPSEG_HOME=DIR puts them in DIR/released); downloaded on first use "
             "from the authors' Google Drive links (github.com/hynnsk/HP).\n"
             "* = as restated in hpseg's spec, not yet checked against the paper's PDF. A released model segments with "
             "its linear head by default (the dataset's classes); --head cluster gives cluster ids.\n"
             "Use: hpseg predict PHOTOS --model NAME --out preds/ | hpseg.load(NAME) | hpseg eval NAME --data-root DIR --crf")
    sep = "  ".join("-" * width for width in widths) + "  " + "-" * len(header[-1])
    return "\n".join([line(header), sep, *(line(row) for row in rows), "", notes])


def paper_comparison(model: ReleasedModel, measured: dict[str, float], crf: bool) -> str:
    """Lines setting the paper's numbers beside an evaluation's (``measured``: fractions)."""
    if not model.paper.items():
        return f"the paper reports no number for {model.name} ({model.paper.note})"
    lines = [f"paper vs this evaluation ({model.paper.note}; this evaluation {'with' if crf else 'without'} CRF):"]
    for key, value in model.paper.items():
        star = " (*not checked against the PDF)" if key in model.paper.unchecked else ""
        ours = measured.get(key)
        here = "   n/a" if ours is None else f"{100 * ours:6.2f}"
        lines.append(f"  {key.replace('_', ' '):<24} paper {value:5.1f}   here {here}{star}")
    return "\n".join(lines)
