"""Raw datasets: the on-disk layouts of spec §7 read into (RGB image, class-id map) pairs.

Every dataset checks its layout in the constructor, before any pixel is read: a missing
directory, split list, image or label file raises :class:`~hpseg.data.DatasetLayoutError`
naming the missing path and drawing the expected layout. Reading is done per item by
:meth:`RawDataset.read` (raises :class:`~hpseg.data.ImageReadError` on a bad file) and
:meth:`RawDataset.__getitem__` (same, or skip-and-substitute with ``skip_bad_images``).

Labels are returned as ``(H, W)`` int64 maps of class ids in ``[0, n_classes)``, −1 = ignore.

Datasets (``DATASETS``):

``cocostuff27``
    ``images/{train2017,val2017}/ID.jpg``, ``annotations/{train2017,val2017}/ID.png`` (fine ids
    0..181, 255 unlabeled) and the curated image lists; fine → 27 coarse classes with
    ``cocostuff27.json``; unlabeled (and any id absent from the mapping) → −1.
``cityscapes27``
    ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and ``gtFine/{split}/{city}/*_gtFine_labelIds.png``;
    class = labelId − 7 for labelIds 7..33, everything else → −1.
``potsdam3``
    The STEGO/IIC release: ``imgs/ID.mat`` (key ``img``, H×W×4 uint8 R, G, B, IR — the first three
    channels are used), ``gt/ID.mat`` (key ``gt``, int32 fine ids 0..5, 255 unlabeled) and split lists.
    ``train`` = ``labelled_train.txt`` **[ref quirk]** (the authors' training set), or with
    ``potsdam_lists="all"`` ``unlabelled_train.txt`` + ``labelled_train.txt`` (every training
    image: HP needs no labels; the label maps, where present, only feed the linear probe);
    ``val`` = ``labelled_test.txt``. Images of ``unlabelled_train.txt`` may lack a ``gt`` file:
    their label is all −1. Coarse map {0, 4 → 0 roads and cars; 1, 5 → 1 buildings and clutter;
    2, 3 → 2 trees and vegetation; anything else → −1}.

Label ids that a dataset's class table does not list (COCO fine ids 182–254, Potsdam ids other
than 0–5 and 255) become −1 (ignored). The authors' code makes them class 0; real releases hold
none, so the two agree on real data, and hpseg does not invent a class for ids it cannot name.
``folder``
    Users' own images: ``root/images/**`` (any nesting; any ending of ``IMAGE_SUFFIXES`` in any case),
    optional ``root/labels/**`` single-channel PNGs with the same relative stems (values = class
    ids, 255 → −1). If ``root/{split}/images`` exists that split folder is used instead of
    ``root`` (otherwise every split reads ``root/images``). Class names come from
    ``classes.txt`` (one per line; looked up in the split folder, then in ``root``), else the
    ``n_classes`` argument, else the largest label value + 1 (a scan of all label files), with
    names ``"class 0"``, ``"class 1"``, ...

For the three benchmarks, ``root`` may also be the parent directory that holds the dataset
under its conventional name (``cocostuff/``, ``cityscapes/``, ``potsdam/``, as in STEGO's
``pytorch_data_dir``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from PIL import Image

from hpseg.errors import InvalidInputError

from .errors import DatasetLayoutError, ImageReadError
from .images import IMAGE_SUFFIXES, array_to_rgb, read_image, read_label

logger = logging.getLogger(__name__)

__all__ = [
    "CITYSCAPES27_CLASS_NAMES",
    "DATASETS",
    "POTSDAM3_CLASS_NAMES",
    "Cityscapes27",
    "CocoStuff27",
    "FolderDataset",
    "Potsdam3",
    "RawDataset",
    "RawSample",
    "build_raw_dataset",
    "dataset_class_names",
    "load_cocostuff27_mapping",
]


CITYSCAPES27_CLASS_NAMES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
]  # fmt: skip
POTSDAM3_CLASS_NAMES = ["roads and cars", "buildings and clutter", "trees and vegetation"]
#: Potsdam's training lists: "labelled" = labelled_train.txt [ref quirk]; "all" = + unlabelled_train.txt.
PotsdamLists = Literal["labelled", "all"]


@dataclass
class RawSample:
    """One raw dataset item.

    image: RGB uint8 PIL image (H, W).
    label: (H, W) int64 class ids in [0, n_classes), −1 = ignore; None when the dataset has no labels.
    key:   unique, filesystem-safe id (e.g. the relative path without extension, '/' -> '__').
    """

    image: Image.Image
    label: np.ndarray | None
    key: str


@dataclass(frozen=True)
class _Item:
    image: Path
    label: Path | None  # None: no label file (all −1 if the dataset has labels, else no label)
    key: str


_UNSAFE = re.compile(r"[^\w.+=-]")  # \w: letters and digits of any script, and _


def safe_key(relative: str) -> str:
    """Relative path (no extension) -> filesystem-safe key: '/' -> '__', odd characters -> '_'.

    Letters and digits of any script are kept (``猫`` stays ``猫``), so keys stay readable.
    """
    return _UNSAFE.sub("_", relative.replace("\\", "/").replace("/", "__"))


def unique_keys(relatives: list[str]) -> list[str]:
    """:func:`safe_key` of each relative path, made unique: keys that two paths share (``a b``
    and ``a_b``) get a short hash of their own path appended."""
    keys = [safe_key(rel) for rel in relatives]
    counts = Counter(keys)
    return [f"{key}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}" if counts[key] > 1 else key
            for key, rel in zip(keys, relatives)]


def _apply_lut(values: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map stored ids through ``lut`` (int64, −1 = ignore); ids outside the table -> −1."""
    out = np.full(values.shape, -1, dtype=np.int64)
    ok = (values >= 0) & (values < len(lut))
    out[ok] = lut[values[ok]]
    return out


def _layout_error(what: str, path: Path, layout: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"{what}: {path}\nexpected layout:\n{layout}", path)


def _list_names(directory: Path) -> set[str]:
    # One listdir per directory instead of a stat per file: 118k COCO names take ~50 ms.
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


def _read_id_list(path: Path, layout: str) -> list[str]:
    if not path.is_file():
        raise _layout_error("missing split list", path, layout)
    ids = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s:
            ids.append(s)
    return ids


def _resolve_root(root: Path, marker: str, conventional: str) -> Path:
    """Accept both the dataset directory and its parent (STEGO's ``pytorch_data_dir``)."""
    if not (root / marker).exists() and (root / conventional / marker).exists():
        return root / conventional
    return root


class RawDataset:
    """Base class of the raw datasets: an indexed list of (image file, label file, key).

    Attributes: ``name``, ``split``, ``root`` (Path), ``n_classes``, ``class_names``,
    ``has_labels``, ``skip_bad_images``, ``skipped`` (list of Paths skipped so far).
    Subclasses fill ``_items`` in their constructor and may override :meth:`_load_image` and
    :meth:`_load_label` (which maps stored ids to classes).
    """

    name: ClassVar[str] = ""
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(
        self,
        root: Path,
        split: str,
        items: list[_Item],
        *,
        n_classes: int,
        class_names: list[str],
        has_labels: bool,
        skip_bad_images: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self._items = items
        self.n_classes = int(n_classes)
        self.class_names = list(class_names)
        self.has_labels = bool(has_labels)
        self.skip_bad_images = bool(skip_bad_images)
        self.skipped: list[Path] = []
        if len(self.class_names) != self.n_classes:
            raise InvalidInputError(f"{len(self.class_names)} class names for {self.n_classes} classes")
        keys = [it.key for it in items]
        if len(set(keys)) != len(keys):
            seen: dict[str, Path] = {}
            for it in items:
                if it.key in seen:
                    raise DatasetLayoutError(
                        f"two images map to the same key {it.key!r}: {seen[it.key]} and {it.image} "
                        "(same name with different extensions?) — rename one of them",
                        it.image,
                    )
                seen[it.key] = it.image

    # -- indexing -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def path_of(self, i: int) -> Path:
        """Image file of item ``i``."""
        return self._items[i].image

    def label_path_of(self, i: int) -> Path | None:
        """Label file of item ``i`` (None when it has none)."""
        return self._items[i].label

    def key_of(self, i: int) -> str:
        """Key of item ``i`` without reading it."""
        return self._items[i].key

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, root='{self.root}', "
            f"n={len(self)}, n_classes={self.n_classes}, has_labels={self.has_labels})"
        )

    # -- reading --------------------------------------------------------------------------------
    def _load_image(self, path: Path) -> Image.Image:
        return read_image(path)

    def _load_label(self, path: Path) -> np.ndarray:
        """Class ids of a label PNG: its stored ids through the dataset's lookup table ``_lut``."""
        lut = getattr(self, "_lut", None)
        if lut is None:
            raise NotImplementedError(f"{type(self).__name__} reads its labels its own way")
        return _apply_lut(read_label(path), lut)

    def read(self, i: int) -> RawSample:
        """Read item ``i``; raises ImageReadError (naming the file) if it cannot be read."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        item = self._items[i]
        image = self._load_image(item.image)
        label = None
        if self.has_labels:
            if item.label is None:
                label = np.full((image.height, image.width), -1, dtype=np.int64)
            else:
                label = self._load_label(item.label)
                if label.shape != (image.height, image.width):
                    raise ImageReadError(
                        f"label {item.label} has size {label.shape[1]}x{label.shape[0]} but image "
                        f"{item.image} is {image.width}x{image.height}",
                        item.label,
                    )
        return RawSample(image=image, label=label, key=item.key)

    def __getitem__(self, i: int) -> RawSample:
        """Item ``i`` as a RawSample.

        With ``skip_bad_images`` an unreadable item is recorded in ``skipped`` (with one logged
        warning per file) and the next readable item is returned instead, so that the length seen by
        samplers stays fixed; without it the ImageReadError propagates.
        """
        if not self.skip_bad_images:
            return self.read(i)
        n = len(self)
        for step in range(n):
            j = (i + step) % n
            try:
                return self.read(j)
            except ImageReadError as e:
                self.note_skipped(self._items[j].image, e)
        raise ImageReadError(f"no readable image in {self.root} ({self.name}/{self.split})", self.root)

    def note_skipped(self, path: Path, error: Exception) -> None:
        """Record a skipped file, warning once per file."""
        if path not in self.skipped:
            self.skipped.append(path)
            # A log record, not warnings.warn: the hpseg command shows it as one line above its
            # progress bar instead of a Python warning with its source line.
            logger.warning("skipping unreadable image %s: %s", path, error)


# ------------------------------------------------------------------------------------------------
# COCO-Stuff-27


def load_cocostuff27_mapping() -> tuple[np.ndarray, list[str]]:
    """(256,) int64 fine -> coarse lookup table (−1 for unlabeled/unknown) and the 27 names."""
    text = resources.files("hpseg.data").joinpath("cocostuff27.json").read_text()
    spec = json.loads(text)
    lut = np.full(256, -1, dtype=np.int64)
    for fine, coarse in spec["fine_to_coarse"].items():
        lut[int(fine)] = int(coarse)
    return lut, list(spec["coarse_names"])


def dataset_class_names(dataset: str) -> list[str] | None:
    """The class names of a dataset with fixed classes (``cocostuff27``, ``cityscapes27``,
    ``potsdam3``); None for a dataset whose classes are its own (``folder``)."""
    if dataset == "cocostuff27":
        return list(load_cocostuff27_mapping()[1])
    fixed = {"cityscapes27": CITYSCAPES27_CLASS_NAMES, "potsdam3": POTSDAM3_CLASS_NAMES}.get(dataset)
    return None if fixed is None else list(fixed)


_COCO_LAYOUT = """\
    <root>/
        images/
            train2017/ID.jpg
            val2017/ID.jpg
        annotations/
            train2017/ID.png        (fine ids 0..181, 255 = unlabeled)
            val2017/ID.png
        curated/
            train2017/Coco164kFull_Stuff_Coarse.txt     (one image ID per line)
            val2017/Coco164kFull_Stuff_Coarse_7.txt"""


class CocoStuff27(RawDataset):
    """COCO-Stuff with the 27 coarse classes (spec §7)."""

    name = "cocostuff27"
    _SPLIT_DIR: ClassVar[dict[str, str]] = {"train": "train2017", "val": "val2017"}
    _LIST: ClassVar[dict[str, str]] = {
        "train": "curated/train2017/Coco164kFull_Stuff_Coarse.txt",
        "val": "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt",
    }

    def __init__(self, root: str | Path, split: str, *, skip_bad_images: bool = False) -> None:
        root = _resolve_root(Path(root), "images", "cocostuff")
        sd = self._SPLIT_DIR[split]
        img_dir, ann_dir = root / "images" / sd, root / "annotations" / sd
        for d in (root, img_dir, ann_dir):
            if not d.is_dir():
                raise _layout_error("missing directory", d, _COCO_LAYOUT)
        ids = _read_id_list(root / self._LIST[split], _COCO_LAYOUT)
        img_names, ann_names = _list_names(img_dir), _list_names(ann_dir)
        items = []
        for raw_id in ids:
            stem = raw_id.rsplit(".", 1)[0] if raw_id.lower().endswith((".jpg", ".png")) else raw_id
            if stem + ".jpg" not in img_names:
                raise _layout_error(
                    f"missing image listed in {self._LIST[split]}", img_dir / f"{stem}.jpg", _COCO_LAYOUT
                )
            if stem + ".png" not in ann_names:
                raise _layout_error(
                    f"missing label for listed image {stem}", ann_dir / f"{stem}.png", _COCO_LAYOUT
                )
            items.append(_Item(img_dir / f"{stem}.jpg", ann_dir / f"{stem}.png", safe_key(stem)))
        self._lut, names = load_cocostuff27_mapping()
        super().__init__(
            root,
            split,
            items,
            n_classes=len(names),
            class_names=names,
            has_labels=True,
            skip_bad_images=skip_bad_images,
        )

# ------------------------------------------------------------------------------------------------
# Cityscapes-27

_CITYSCAPES_LAYOUT = """\
    <root>/
        leftImg8bit/
            {train,val}/
                <city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/
            {train,val}/
                <city>/<city>_<seq>_<frame>_gtFine_labelIds.png"""


class Cityscapes27(RawDataset):
    """Cityscapes with the 27 classes of labelIds 7..33 (class = labelId − 7)."""

    name = "cityscapes27"
    _IMG_SUFFIX = "_leftImg8bit.png"
    _GT_SUFFIX = "_gtFine_labelIds.png"

    def __init__(self, root: str | Path, split: str, *, skip_bad_images: bool = False) -> None:
        root = _resolve_root(Path(root), "leftImg8bit", "cityscapes")
        img_root, gt_root = root / "leftImg8bit" / split, root / "gtFine" / split
        for d in (root, img_root, gt_root):
            if not d.is_dir():
                raise _layout_error("missing directory", d, _CITYSCAPES_LAYOUT)
        items = []
        for city in sorted(p.name for p in img_root.iterdir() if p.is_dir()):
            gt_dir = gt_root / city
            if not gt_dir.is_dir():
                raise _layout_error("missing label directory", gt_dir, _CITYSCAPES_LAYOUT)
            gt_names = _list_names(gt_dir)
            for fname in sorted(_list_names(img_root / city)):
                if not fname.endswith(self._IMG_SUFFIX):
                    continue
                base = fname[: -len(self._IMG_SUFFIX)]
                gt_name = base + self._GT_SUFFIX
                if gt_name not in gt_names:
                    raise _layout_error(
                        f"missing label for image {img_root / city / fname}",
                        gt_dir / gt_name,
                        _CITYSCAPES_LAYOUT,
                    )
                items.append(_Item(img_root / city / fname, gt_dir / gt_name, safe_key(f"{city}/{base}")))
        if not items:
            raise _layout_error("no *_leftImg8bit.png images found", img_root, _CITYSCAPES_LAYOUT)
        lut = np.full(256, -1, dtype=np.int64)
        lut[7:34] = np.arange(27)
        self._lut = lut
        super().__init__(
            root,
            split,
            items,
            n_classes=27,
            class_names=CITYSCAPES27_CLASS_NAMES,
            has_labels=True,
            skip_bad_images=skip_bad_images,
        )

# ------------------------------------------------------------------------------------------------
# Potsdam-3

_POTSDAM_LAYOUT = """\
    <root>/
        imgs/ID.mat      (key 'img': H x W x 4 uint8, R G B IR)
        gt/ID.mat        (key 'gt': H x W int fine ids 0..5, 255 = unlabeled)
        labelled_train.txt
        unlabelled_train.txt
        labelled_test.txt
        all.txt          (not used)"""


def _loadmat_key(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat  # scipy.io is slow to import; only Potsdam needs it

    try:
        data = loadmat(path, variable_names=[key])
    except FileNotFoundError as e:
        raise ImageReadError(f"cannot read {path}: file not found", path) from e
    except Exception as e:
        raise ImageReadError(f"cannot read {path}: {type(e).__name__}: {e}", path) from e
    if key not in data:
        raise ImageReadError(f"cannot read {path}: no variable {key!r} in the .mat file", path)
    return np.asarray(data[key])


class Potsdam3(RawDataset):
    """ISPRS Potsdam, STEGO's preprocessed release, 3 coarse classes."""

    name = "potsdam3"
    #: The split lists of each split; "train" by ``potsdam_lists``.
    _LISTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "labelled": ("labelled_train.txt",),
        "all": ("unlabelled_train.txt", "labelled_train.txt"),
        "val": ("labelled_test.txt",),
    }
    _OPTIONAL_LABELS: ClassVar[frozenset[str]] = frozenset({"unlabelled_train.txt"})

    def __init__(self, root: str | Path, split: str, *, skip_bad_images: bool = False,
                 potsdam_lists: PotsdamLists = "labelled") -> None:
        root = _resolve_root(Path(root), "imgs", "potsdam")
        img_dir, gt_dir = root / "imgs", root / "gt"
        for d in (root, img_dir, gt_dir):
            if not d.is_dir():
                raise _layout_error("missing directory", d, _POTSDAM_LAYOUT)
        if potsdam_lists not in ("labelled", "all"):
            raise ValueError(f"potsdam_lists must be 'labelled' or 'all', got {potsdam_lists!r}")
        list_names = self._LISTS[potsdam_lists if split == "train" else split]
        lists = [(name, _read_id_list(root / name, _POTSDAM_LAYOUT)) for name in list_names]
        img_names, gt_names = _list_names(img_dir), _list_names(gt_dir)
        items, seen = [], set()
        for list_name, ids in lists:
            for image_id in ids:
                if image_id in seen:  # the lists should be disjoint; never train on a file twice
                    continue
                seen.add(image_id)
                if image_id + ".mat" not in img_names:
                    raise _layout_error(
                        f"missing image listed in {list_name}", img_dir / f"{image_id}.mat", _POTSDAM_LAYOUT
                    )
                label = gt_dir / f"{image_id}.mat"
                if image_id + ".mat" not in gt_names:
                    if list_name not in self._OPTIONAL_LABELS:
                        raise _layout_error(
                            f"missing label for image listed in {list_name}", label, _POTSDAM_LAYOUT
                        )
                    label = None
                items.append(_Item(img_dir / f"{image_id}.mat", label, safe_key(image_id)))
        lut = np.full(256, -1, dtype=np.int64)
        for fine, coarse in {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}.items():
            lut[fine] = coarse
        self._lut = lut
        super().__init__(
            root,
            split,
            items,
            n_classes=3,
            class_names=POTSDAM3_CLASS_NAMES,
            has_labels=True,
            skip_bad_images=skip_bad_images,
        )

    def _load_image(self, path: Path) -> Image.Image:
        a = _loadmat_key(path, "img")
        if a.ndim != 3 or a.shape[2] < 3:
            raise ImageReadError(
                f"cannot read {path}: 'img' has shape {a.shape}, expected H x W x C>=3", path
            )
        # The release stores uint8 (R, G, B, IR); array_to_rgb keeps uint8 as is and scales
        # other dtypes sensibly (float in [0, 1] x 255, uint16 / 257).
        return array_to_rgb(a[:, :, :3])

    def _load_label(self, path: Path) -> np.ndarray:
        g = _loadmat_key(path, "gt")
        if g.ndim == 3 and g.shape[2] == 1:
            g = g[:, :, 0]
        if g.ndim != 2:
            raise ImageReadError(f"cannot read {path}: 'gt' has shape {g.shape}, expected H x W", path)
        return _apply_lut(g.astype(np.int64), self._lut)


# ------------------------------------------------------------------------------------------------
# Folder of the user's own images

_FOLDER_LAYOUT = """\
    <root>/
        images/**/NAME.{jpg,jpeg,png,tif,tiff}   (any nesting)
        labels/**/NAME.png      (optional; same relative path, values = class ids, 255 = ignore)
        classes.txt             (optional; one class name per line)
    or, per split:
    <root>/
        train/images/..., train/labels/...
        val/images/...,   val/labels/...
        classes.txt"""


def _check_image_folder(root: Path, split: str, img_dir: Path) -> None:
    """A clear layout error when a folder dataset's ``images/`` is missing."""
    if img_dir.is_dir():
        return
    if not root.is_dir():
        raise _layout_error("missing dataset root", root, _FOLDER_LAYOUT)
    # With per-split folders present, the split's own folder is what is missing.
    split_layout = any(p.is_dir() and (p / "images").is_dir() for p in root.iterdir())
    missing = root / split / "images" if split_layout else img_dir
    raise _layout_error(f"missing directory (split {split!r})", missing, _FOLDER_LAYOUT)


def walk_files(folder: Path, keep: Callable[[str], bool]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under ``folder`` whose name passes ``keep``, and the folders that were left out.

    Links are followed, hidden entries skipped. A folder reached twice (a symlink loop, or two
    links to one folder) is read once; an unreadable folder is left out. Both are returned as
    (folder, reason) so the caller can say so instead of silently losing images.
    """
    files: list[Path] = []
    left_out: list[tuple[Path, str]] = []
    seen: set[tuple[int, int]] = set()

    def unreadable(error: OSError) -> None:
        left_out.append((Path(error.filename or folder), error.strerror or str(error)))

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        identity = os.stat(dirpath)
        if (identity.st_dev, identity.st_ino) in seen:
            left_out.append((Path(dirpath), "already read through another path (symlink loop?)"))
            dirnames[:] = []
            continue
        seen.add((identity.st_dev, identity.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and keep(f))
    return files, left_out


def _report_left_out(left_out: list[tuple[Path, str]], skip: bool) -> None:
    """Stop on folders that could not be read (or warn, listing them, when skipping is asked for)."""
    if not left_out:
        return
    listing = "; ".join(f"{path} ({reason})" for path, reason in left_out)
    if not skip:
        raise DatasetLayoutError(f"cannot read every folder of the dataset: {listing}; fix the permissions "
                                 "or links, or set data.skip_bad_images=true to leave them out", left_out[0][0])
    logger.warning("left out %d folder(s) of the dataset: %s", len(left_out), listing)


def _image_files(img_dir: Path, skip: bool) -> list[Path]:
    """The images under ``img_dir`` in the order of their relative paths (layout error if none)."""
    files, left_out = walk_files(img_dir, lambda name: name.lower().endswith(IMAGE_SUFFIXES))
    _report_left_out(left_out, skip)
    if not files:
        raise _layout_error(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under", img_dir, _FOLDER_LAYOUT)
    return sorted(files, key=lambda p: p.relative_to(img_dir).as_posix())


def _pair_with_labels(files: list[Path], img_dir: Path, lbl_dir: Path | None, skip: bool) -> list[_Item]:
    """One item per image, with the label PNG of the same relative path when ``lbl_dir`` is given."""
    labels: dict[str, Path] = {}
    if lbl_dir is not None:
        label_files, left_out = walk_files(lbl_dir, lambda name: name.lower().endswith(".png"))
        _report_left_out(left_out, skip)
        for path in label_files:
            labels[path.relative_to(lbl_dir).with_suffix("").as_posix()] = path
    relatives = [file.relative_to(img_dir).with_suffix("").as_posix() for file in files]
    items = []
    for file, rel, key in zip(files, relatives, unique_keys(relatives)):
        label = labels.get(rel) if lbl_dir is not None else None
        if lbl_dir is not None and label is None:
            raise _layout_error(f"missing label for image {file}", lbl_dir / f"{rel}.png", _FOLDER_LAYOUT)
        items.append(_Item(file, label, key))
    return items


def _class_names(root: Path, base: Path, n_classes: int | None) -> list[str] | None:
    """The names in the split's or the root's ``classes.txt`` (checked against ``n_classes``), or None."""
    for candidate in (base / "classes.txt", root / "classes.txt"):
        if not candidate.is_file():
            continue
        names = [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
        if not names:
            raise DatasetLayoutError(f"empty class list {candidate}", candidate)
        if n_classes is not None and n_classes != len(names):
            raise InvalidInputError(f"n_classes={n_classes} but {candidate} lists {len(names)} classes")
        return names
    return None


class FolderDataset(RawDataset):
    """A folder of images, optionally with class-id PNG labels (see the module docstring)."""

    name = "folder"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        n_classes: int | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        root = Path(root)
        base = root / split if (root / split / "images").is_dir() else root
        img_dir, lbl_dir = base / "images", base / "labels"
        _check_image_folder(root, split, img_dir)
        has_labels = lbl_dir.is_dir()
        files = _image_files(img_dir, skip_bad_images)
        items = _pair_with_labels(files, img_dir, lbl_dir if has_labels else None, skip_bad_images)
        names = _class_names(root, base, n_classes)
        if names is None:
            if n_classes is None:
                if not has_labels:
                    raise DatasetLayoutError(
                        f"folder dataset {root} has no labels and no classes.txt: give n_classes "
                        "(the number of clusters to find)",
                        root / "classes.txt",
                    )
                # Costs a read of every label; a classes.txt or n_classes avoids it.
                n_classes = max(1, 1 + max(self._max_label(it.label) for it in items if it.label is not None))
            names = [f"class {k}" for k in range(n_classes)]
        self.base = base  # the folder actually read: root or root/split
        super().__init__(root, split, items, n_classes=len(names), class_names=names, has_labels=has_labels,
                         skip_bad_images=skip_bad_images)

    @staticmethod
    def _max_label(path: Path) -> int:
        v = read_label(path)
        v = v[(v != 255) & (v >= 0)]
        return int(v.max()) if v.size else -1

    def _load_label(self, path: Path) -> np.ndarray:
        v = read_label(path)
        v = np.where((v == 255) | (v < 0), -1, v)
        if v.size and int(v.max()) >= self.n_classes:
            raise ImageReadError(
                f"label {path} contains class id {int(v.max())} but the dataset has {self.n_classes} "
                "classes (255 = ignore); fix classes.txt or n_classes",
                path,
            )
        return v


# ------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[RawDataset]] = {
    "cocostuff27": CocoStuff27,
    "cityscapes27": Cityscapes27,
    "potsdam3": Potsdam3,
    "folder": FolderDataset,
}
DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def build_raw_dataset(
    name: str,
    root: str | Path,
    split: str,
    *,
    n_classes: int | None = None,
    skip_bad_images: bool = False,
    potsdam_lists: PotsdamLists = "labelled",
) -> RawDataset:
    """Open dataset ``name`` (one of ``DATASETS``) at ``root`` for ``split`` ("train" | "val").

    ``n_classes`` is only needed by the folder dataset (without labels or classes.txt); for the
    benchmarks it must match the fixed class count if given. ``potsdam_lists`` picks Potsdam's
    training lists (module docstring). Raises DatasetLayoutError on a bad layout (before reading
    any image).
    """
    if name not in _REGISTRY:
        raise InvalidInputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    cls = _REGISTRY[name]
    if cls is FolderDataset:
        if not split or "/" in split or split.startswith("."):
            raise InvalidInputError(f"invalid split name {split!r}")
        return FolderDataset(root, split, n_classes=n_classes, skip_bad_images=skip_bad_images)
    if split not in cls.SPLITS:
        raise InvalidInputError(f"split must be one of {', '.join(cls.SPLITS)} for {name}, got {split!r}")
    ds = (Potsdam3(root, split, skip_bad_images=skip_bad_images, potsdam_lists=potsdam_lists) if cls is Potsdam3
          else cls(root, split, skip_bad_images=skip_bad_images))
    if n_classes is not None and n_classes != ds.n_classes:
        raise InvalidInputError(f"{name} has {ds.n_classes} classes, n_classes={n_classes} was given")
    return ds
