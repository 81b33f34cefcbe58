"""The data pipeline reproduces the authors' (tests/data/data_*.npz; README there): from the raw
files of tiny COCO-Stuff-27, Cityscapes-27 and Potsdam-3 trees, the real ``hpseg prepare`` (CLI)
and the datasets training and evaluation use (``TrainCrops``, ``ValCrops`` of the raw val split)
give the authors' items, in their order, and their tensors.

What is checked, per dataset:

* item sets and order (Cityscapes as a set: the authors follow the file system's listing);
* validation images exactly, labels exactly under the odd-id rule below;
* training geometry exactly: the authors' own stored crops, read through hpseg's training
  reader, give the authors' training tensors bit for bit;
* training tensors from hpseg's own crops: exactly where hpseg's JPEG writer produces the
  authors' bytes (checked and stated per file); otherwise to ``JPEG_TOLERANCE`` (another Pillow
  / libjpeg encodes differently);
* labels exactly, under hpseg's **odd-id rule**: label ids that the class table does not list
  (COCO fine ids 182–254, Potsdam ids outside 0–5 and 255) are −1 (ignored) in hpseg and class 0
  in the authors' code; reference ids >= n_classes (Cityscapes labelIds above 33) are ignored by
  the authors' losses and metrics and compared as −1. Every other pixel is equal;
* the photometric contract: hpseg's deterministic ``photometric_view`` with the recorded
  parameters gives the recorded outputs to 1e-5.

Files of the same name pattern in ``$HPSEG_EXTRA_GOLDEN`` run too.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpseg.config import load_preset
from hpseg.data import PhotometricParams, TrainCrops, ValCrops, build_raw_dataset, photometric_view
from hpseg.data.datasets import safe_key
from hpseg.data.images import read_label
from hpseg.data.prepare import five_crops
from hpseg.data.transforms import draw_photometric_params, label_view, photometric_augment, val_view

DATA = Path(__file__).parent / "data"
#: Largest difference (normalised units) allowed between hpseg's and the authors' training tensors
#: when hpseg's JPEG encoder writes other bytes than the authors' (4 levels of 255 / the smallest std).
JPEG_TOLERANCE = 4 / 255 / 0.224
PHOTOMETRIC_TOLERANCE = 1e-5


def _golden_files() -> list[Path]:
    files = sorted(DATA.glob("data_*.npz"))
    extra = os.environ.get("HPSEG_EXTRA_GOLDEN")
    if extra:
        if not Path(extra).is_dir():
            raise FileNotFoundError(f"HPSEG_EXTRA_GOLDEN={extra} is not a folder")
        files += [p for p in sorted(Path(extra).glob("data_*.npz")) if p.resolve().parent != DATA.resolve()]
    return files


GOLDEN = _golden_files()
DATASETS = ("cocostuff27", "cityscapes", "potsdam")


def _id(path: Path) -> str:
    return path.stem if path.parent == DATA else f"extra-{path.stem}"


def _blob(g: dict, prefix: str) -> dict[str, bytes]:
    paths, offsets, data = g[f"{prefix}_paths"], g[f"{prefix}_offsets"], g[f"{prefix}_bytes"]
    return {str(p): data[offsets[i]:offsets[i + 1]].tobytes() for i, p in enumerate(paths)}


class Golden:
    """One data golden file, its raw tree re-created and each dataset prepared by ``hpseg prepare``."""

    def __init__(self, path: Path, tmp: Path) -> None:
        with np.load(path) as archive:
            self.g = {key: archive[key] for key in archive.files}
        self.tmp = tmp
        for rel, content in _blob(self.g, "fixture").items():
            (tmp / "raw" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "raw" / rel).write_bytes(content)
        self.ref_crops = _blob(self.g, "ref_crop")
        self.train_res, self.val_res = int(self.g["config/train_res"]), int(self.g["config/val_res"])
        self._prepared: dict[str, Path] = {}

    def name(self, d: str) -> str:
        return str(self.g[f"config/{d}/hpseg_name"])

    def root(self, d: str) -> Path:
        return self.tmp / "raw" / str(self.g[f"config/{d}/root"])

    @property
    def overrides(self) -> list[str]:
        """The fixture's resolutions; every other setting is the preset's default."""
        return [f"data.crop_size={self.train_res}", f"data.val_size={self.val_res}"]

    def prepared(self, d: str) -> Path:
        """The training set of dataset ``d`` as the real CLI prepares it with the preset's defaults."""
        if d not in self._prepared:
            out = self.tmp / f"prepared_{d}"
            subprocess.run([sys.executable, "-m", "hpseg", "prepare", "--preset", self.name(d), "--data-root",
                            str(self.root(d)), "--out", str(out), *self.overrides],
                           check=True, capture_output=True, text=True)
            self._prepared[d] = out
        return self._prepared[d]

    def validation(self, d: str) -> ValCrops:
        """The validation set as training and evaluation build it (raw val split, ValCrops at val_size)."""
        config = load_preset(self.name(d)).override(self.overrides)
        raw = build_raw_dataset(config.data.dataset, self.root(d), "val", n_classes=config.method.n_classes)
        return ValCrops(raw, size=config.data.val_size)

    def train_stems(self, d: str) -> list[str]:
        """hpseg's item names of the authors' training items, in the authors' order."""
        names, crops = self.g[f"{d}/train/name"], self.g[f"{d}/train/crop"]
        return [safe_key(str(n)) if c < 0 else f"{safe_key(str(n))}_{int(c)}" for n, c in zip(names, crops)]


@pytest.fixture(scope="module", params=GOLDEN, ids=_id)
def golden(request, tmp_path_factory) -> Golden:
    return Golden(request.param, tmp_path_factory.mktemp(_id(request.param)))


def _odd_ids(d: str, label_file: Path) -> np.ndarray:
    """(H, W) bool: the raw label ids that the class table of ``d`` does not list."""
    if d == "potsdam":
        from scipy.io import loadmat

        raw = np.asarray(loadmat(label_file)["gt"]).astype(np.int64)
        return ~np.isin(raw, [0, 1, 2, 3, 4, 5, 255])
    raw = read_label(label_file)
    return (raw >= 182) & (raw <= 254) if d == "cocostuff27" else np.zeros(raw.shape, bool)


def _expected_labels(reference: np.ndarray, odd: np.ndarray, n_classes: int) -> np.ndarray:
    """The authors' labels under hpseg's rule: ids >= n_classes and odd ids (class 0 there) -> −1."""
    out = np.where(reference >= n_classes, -1, reference).astype(np.int64)
    assert (out[odd] == 0).all(), "the authors make odd ids class 0"
    out[odd] = -1
    return out


def _label_file(g: Golden, d: str, source: str) -> Path:
    """The raw label file of an image path (relative to the dataset folder)."""
    if d == "cocostuff27":
        return g.root(d) / source.replace("images/", "annotations/").replace(".jpg", ".png")
    if d == "cityscapes":
        return g.root(d) / source.replace("leftImg8bit/", "gtFine/", 1).replace("_leftImg8bit.png",
                                                                                "_gtFine_labelIds.png")
    return g.root(d) / source.replace("imgs/", "gt/")


@pytest.mark.parametrize("d", DATASETS)
def test_validation_items_exact(golden, d):
    """Validation: same items in the same order, images exact, labels exact under the odd-id rule."""
    g = golden
    val = g.validation(d)
    names = [str(n) for n in g.g[f"{d}/val/name"]]
    assert [val.raw.key_of(i) for i in range(len(val))] == [safe_key(n) for n in names]
    n_classes = int(g.g[f"config/{d}/n_classes"])
    odd_pixels = 0
    for i, source in enumerate(g.g[f"{d}/val/source"]):
        item = val[i]
        np.testing.assert_array_equal(item["image"].numpy(), g.g[f"{d}/val/image"][i])
        odd = _odd_ids(d, _label_file(g, d, str(source)))
        odd = val_view(val.raw.read(i).image, odd.astype(np.int64), g.val_res)[1].astype(bool)
        odd_pixels += int(odd.sum())
        np.testing.assert_array_equal(item["label"].numpy(), _expected_labels(g.g[f"{d}/val/label"][i], odd, n_classes))
    if d in ("cocostuff27", "potsdam"):
        assert odd_pixels > 0, "the fixture holds odd ids: the rule must have been exercised"


@pytest.mark.parametrize("d", DATASETS)
def test_training_items_set_and_order(golden, d):
    g = golden
    crops = TrainCrops(g.prepared(d), with_augmented=False)
    expected = g.train_stems(d)
    if d == "cityscapes":  # the authors follow the machine's directory listing
        assert sorted(crops.crops) == sorted(expected)
    else:
        assert crops.crops == expected
    assert crops.manifest["crop_rule"] == ("five" if bool(g.g[f"config/{d}/train_uses_five_crops"]) else "whole")


def _crop_folder(g: Golden, d: str) -> str:
    return f"{g.g[f'config/{d}/root']}/cropped/{d}_five_crop_{float(g.g['config/crop_ratio'])}"


def _with_reference_crops(g: Golden, d: str, tmp: Path) -> TrainCrops:
    """hpseg's prepared set of ``d`` with the authors' stored crop files in place of hpseg's own
    (the authors' training item j reads their crop file j)."""
    prepared = g.prepared(d)
    copy = tmp / f"reference_crops_{d}"
    (copy / "images").mkdir(parents=True)
    (copy / "labels").mkdir()
    (copy / "manifest.json").write_bytes((prepared / "manifest.json").read_bytes())
    folder = _crop_folder(g, d)
    for j, stem in enumerate(g.train_stems(d)):
        (copy / "images" / f"{stem}.jpg").write_bytes(g.ref_crops[f"{folder}/img/train/{j}.jpg"])
        stored = np.asarray(Image.open(io.BytesIO(g.ref_crops[f"{folder}/label/train/{j}.png"]))).astype(np.int64)
        labels = np.where(stored == 0, 255, stored - 1).clip(0, 255).astype(np.uint8)  # label + 1 -> hpseg's
        Image.fromarray(labels, "L").save(copy / "labels" / f"{stem}.png")
    return TrainCrops(copy, with_augmented=False)


def _reference_index(g: Golden, d: str) -> dict[str, int]:
    return {stem: i for i, stem in enumerate(g.train_stems(d))}


@pytest.mark.parametrize("d", ["cocostuff27", "cityscapes"])
def test_training_geometry_exact_on_the_authors_crops(golden, d, tmp_path):
    """The authors' stored JPEG crops through hpseg's training reader give their tensors bit for bit."""
    g = golden
    crops = _with_reference_crops(g, d, tmp_path)
    index = _reference_index(g, d)
    for i, stem in enumerate(crops.crops):
        np.testing.assert_array_equal(crops[i]["image"].numpy(), g.g[f"{d}/train/image"][index[stem]], err_msg=stem)


def _training_odd_mask(g: Golden, d: str, crops: TrainCrops, i: int) -> np.ndarray:
    """The odd-id pixels of training item ``i`` (the raw map through hpseg's item geometry)."""
    key, crop = (crops.crops[i], None) if crops.manifest["crop_rule"] == "whole" else crops.crops[i].rsplit("_", 1)
    reference = g.train_stems(d).index(crops.crops[i])
    source = str(g.g[f"{d}/train/source"][reference])
    odd = _odd_ids(d, _label_file(g, d, source)).astype(np.int64)
    if crop is None:
        return label_view(odd, g.train_res).astype(bool)
    image = Image.new("RGB", odd.shape[::-1])
    stored = np.asarray(five_crops(image, odd, None)[int(crop)][1]).astype(np.int64)
    return label_view(stored, g.train_res).astype(bool)


@pytest.mark.parametrize("d", DATASETS)
def test_training_tensors_and_labels(golden, d):
    """hpseg's own prepared items: images exact where its JPEG bytes are the authors' (else to
    JPEG_TOLERANCE, and the test says so), labels exact under the odd-id rule."""
    g = golden
    crops = TrainCrops(g.prepared(d), with_augmented=False)
    index = _reference_index(g, d)
    n_classes = int(g.g[f"config/{d}/n_classes"])
    same_bytes, worst = 0, 0.0
    for i, stem in enumerate(crops.crops):
        item, j = crops[i], index[stem]
        reference = g.g[f"{d}/train/image"][j]
        if crops.suffix == ".jpg":
            same = crops.image_path(i).read_bytes() == g.ref_crops[f"{_crop_folder(g, d)}/img/train/{j}.jpg"]
        else:
            same = True  # lossless items (Potsdam's whole tiles): must be exact
        same_bytes += same
        difference = float(np.abs(item["image"].numpy() - reference).max())
        worst = max(worst, difference)
        if same:
            assert difference == 0.0, f"{stem}: same bytes as the authors' crop, different tensor"
        else:
            assert difference <= JPEG_TOLERANCE, f"{stem}: JPEG encoded differently, off by {difference}"
        odd = _training_odd_mask(g, d, crops, i)
        np.testing.assert_array_equal(item["label"].numpy(), _expected_labels(g.g[f"{d}/train/label"][j], odd,
                                                                                n_classes), err_msg=stem)
    if same_bytes < len(crops):
        pytest.xfail(f"{d}: this Pillow wrote {len(crops) - same_bytes} of {len(crops)} JPEG crops with other bytes "
                     f"than the authors'; their tensors agree to {worst:.3g} <= {JPEG_TOLERANCE:.3g}")


def test_photometric_contract(golden):
    """photometric_view with the recorded parameters reproduces the authors' views to 1e-5."""
    g = golden.g

    def factor(name: str, k: int) -> float | None:
        value = float(g[f"photometric/{name}"][k])
        return None if np.isnan(value) else value

    assert int(g["photometric/blur_kernel"]) == 5
    for k in range(len(g["photometric/index"])):
        params = PhotometricParams(tuple(int(i) for i in g["photometric/order"][k]), factor("brightness", k),
                                   factor("contrast", k), factor("saturation", k), factor("hue", k),
                                   bool(g["photometric/grayscale"][k]), factor("blur_sigma", k))
        d, i = str(g["photometric/dataset"][k]), int(g["photometric/index"][k])
        np.testing.assert_array_equal(g["photometric/input"][k], g[f"{d}/train/image"][i])
        out = photometric_view(torch.from_numpy(g["photometric/input"][k]), params)
        np.testing.assert_allclose(out.numpy(), g["photometric/output"][k], rtol=0, atol=PHOTOMETRIC_TOLERANCE,
                                   err_msg=f"case {k}: {params}")


def test_random_views_draw_then_apply(golden):
    """The random augmentation is the deterministic view of what it draws, and the default view
    (of the normalised tensor, [ref quirk]) lies in [0, 1] like the authors' (``img_aug_*``)."""
    g = golden.g
    image = torch.from_numpy(g["cocostuff27/train/image"][0])
    for seed in range(6):
        params = draw_photometric_params(torch.Generator().manual_seed(seed))
        view = photometric_augment(image, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(view, photometric_view(image, params), rtol=0, atol=0)
        assert 0.0 <= float(view.min()) and float(view.max()) <= 1.0
    for d in DATASETS:
        assert g[f"{d}/train/img_aug_min"].min() >= 0.0 and g[f"{d}/train/img_aug_max"].max() <= 1.0


def test_extra_golden_folder_adds_data_files(tmp_path, monkeypatch):
    """$HPSEG_EXTRA_GOLDEN adds its data_*.npz files (other names ignored, tests/data not twice)."""
    (tmp_path / "data_b.npz").write_bytes(b"")
    (tmp_path / "hp_z.npz").write_bytes(b"")
    public = [p.stem for p in sorted(DATA.glob("data_*.npz"))]
    assert "data_a" in public
    monkeypatch.setenv("HPSEG_EXTRA_GOLDEN", str(tmp_path))
    assert [_id(p) for p in _golden_files()] == [*public, "extra-data_b"]
    monkeypatch.setenv("HPSEG_EXTRA_GOLDEN", str(DATA))
    assert [_id(p) for p in _golden_files()] == public
    monkeypatch.setenv("HPSEG_EXTRA_GOLDEN", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        _golden_files()
