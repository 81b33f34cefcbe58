"""Tests of hpseg.data: dataset layouts, image reading, five-crop preparation, crop datasets.

Every dataset is written by the test itself, in the real on-disk layout, with tiny images.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from hpseg.config import Config
from hpseg.data import (
    DATASETS,
    DatasetLayoutError,
    ImageReadError,
    PhotometricParams,
    RawSample,
    TrainCrops,
    ValCrops,
    build_raw_dataset,
    draw_photometric_params,
    normalize,
    photometric_augment,
    photometric_view,
    prepare_five_crops,
    prepare_training_set,
)
from hpseg.data.images import read_image, read_label
from hpseg.training.run_checks import check_prepared_recipe
from tests.helpers import COCO_IDS, FINE, H, W, make_coco, random_rgb, save_png, stripes

# ------------------------------------------------------------------------------------------------
# COCO-Stuff-27


def test_cocostuff_fine_to_coarse(tmp_path):
    root = make_coco(tmp_path / "cocostuff")
    spec = json.loads((Path(__file__).parents[1] / "src/hpseg/data/cocostuff27.json").read_text())
    ds = build_raw_dataset("cocostuff27", root, "train")
    assert len(ds) == 2 and ds.n_classes == 27 and ds.class_names == spec["coarse_names"]
    s = ds[1]
    assert isinstance(s, RawSample) and s.key == COCO_IDS[1] and s.image.mode == "RGB"
    assert s.label.dtype == np.int64 and s.label.shape == (H, W)
    # Hand-checked: 0 person -> person, 9 traffic light -> outdoor, 91 banner -> textile,
    # 100 carpet -> floor, 181 wood -> solid, 255 unlabeled -> -1.
    by_hand = {0: "person", 9: "outdoor", 91: "textile", 100: "floor", 181: "solid"}
    bands = np.array_split(np.arange(W), len(FINE))
    for fine, cols in zip(FINE, bands):
        expected = -1 if fine == 255 else spec["fine_to_coarse"][str(fine)]
        assert (s.label[:, cols] == expected).all(), fine
        if fine in by_hand:
            assert ds.class_names[expected] == by_hand[fine]
    # The parent directory (STEGO's pytorch_data_dir) is accepted as well.
    assert len(build_raw_dataset("cocostuff27", tmp_path, "val")) == 2


def test_cocostuff_missing_split_list_and_label(tmp_path):
    root = make_coco(tmp_path)
    lst = root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"
    lst.unlink()
    with pytest.raises(DatasetLayoutError) as e:
        build_raw_dataset("cocostuff27", root, "val")
    msg = str(e.value)
    assert str(lst) in msg and "expected layout" in msg and "\n    " in msg
    lab = root / "annotations/train2017" / f"{COCO_IDS[0]}.png"
    lab.unlink()
    with pytest.raises(DatasetLayoutError, match="missing label") as e:
        build_raw_dataset("cocostuff27", root, "train")
    assert str(lab) in str(e.value)
    with pytest.raises(DatasetLayoutError, match="missing directory"):
        build_raw_dataset("cocostuff27", tmp_path / "nowhere", "train")


# ------------------------------------------------------------------------------------------------
# Cityscapes-27


def test_cityscapes_label_ids(tmp_path):
    ids = [0, 6, 7, 8, 20, 33, 255]
    for split in ("train", "val"):
        for city in ("aachen", "bochum"):
            base = f"{city}_000000_000019"
            save_png(random_rgb(1), tmp_path / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png")
            save_png(stripes(ids), tmp_path / "gtFine" / split / city / f"{base}_gtFine_labelIds.png")
            # other gtFine files of the official release must be ignored
            save_png(stripes(ids), tmp_path / "gtFine" / split / city / f"{base}_gtFine_instanceIds.png")
    ds = build_raw_dataset("cityscapes27", tmp_path, "val")
    assert (
        len(ds) == 2
        and ds.n_classes == 27
        and ds.class_names[0] == "road"
        and ds.class_names[-1] == "bicycle"
    )
    assert ds.class_names[11] == "polegroup" and len(ds.class_names) == 27
    s = ds[0]
    assert s.key == "aachen__aachen_000000_000019"
    for lid, cols in zip(ids, np.array_split(np.arange(W), len(ids))):
        expected = lid - 7 if 7 <= lid <= 33 else -1
        assert (s.label[:, cols] == expected).all(), lid
    (tmp_path / "gtFine/train/bochum/bochum_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetLayoutError, match="bochum_000000_000019_gtFine_labelIds.png"):
        build_raw_dataset("cityscapes27", tmp_path, "train")


# ------------------------------------------------------------------------------------------------
# Potsdam-3


def test_potsdam_mat_and_coarse_map(tmp_path):
    fine = [0, 1, 2, 3, 4, 5, 255]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "gt").mkdir()
    for i, name in enumerate(["a0", "a1", "u0", "t0"]):
        img = np.random.default_rng(i).integers(0, 256, size=(H, W, 4), dtype=np.uint8)  # R G B IR
        savemat(tmp_path / "imgs" / f"{name}.mat", {"img": img})
        if name != "u0":  # an unlabelled training image without a gt file
            savemat(tmp_path / "gt" / f"{name}.mat", {"gt": stripes(fine).astype(np.int32)})
    (tmp_path / "labelled_train.txt").write_text("a0\na1\n")
    (tmp_path / "unlabelled_train.txt").write_text("u0\n")
    (tmp_path / "labelled_test.txt").write_text("t0\n")
    (tmp_path / "all.txt").write_text("a0\na1\nu0\nt0\n")

    # [ref quirk] the authors' training set is labelled_train.txt alone; "all" adds the unlabelled list.
    labelled = build_raw_dataset("potsdam3", tmp_path, "train")
    assert [labelled.key_of(i) for i in range(len(labelled))] == ["a0", "a1"]
    train = build_raw_dataset("potsdam3", tmp_path, "train", potsdam_lists="all")
    assert [train.key_of(i) for i in range(len(train))] == ["u0", "a0", "a1"]
    assert train.n_classes == 3 and train.has_labels
    assert (train[0].label == -1).all()  # no gt file -> all ignore
    val = build_raw_dataset("potsdam3", tmp_path, "val")
    s = val[0]
    img = np.random.default_rng(3).integers(0, 256, size=(H, W, 4), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(s.image), img[:, :, :3])  # uint8 kept as is
    coarse = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: -1}
    for f, cols in zip(fine, np.array_split(np.arange(W), len(fine))):
        assert (s.label[:, cols] == coarse[f]).all(), f

    # float images in [0, 1] are scaled to 0..255
    savemat(tmp_path / "imgs" / "t0.mat", {"img": img.astype(np.float32) / 255.0})
    np.testing.assert_allclose(np.asarray(val[0].image).astype(int), img[:, :, :3].astype(int), atol=1)

    (tmp_path / "gt" / "a1.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="a1.mat"):
        build_raw_dataset("potsdam3", tmp_path, "train")
    (tmp_path / "labelled_test.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="labelled_test.txt"):
        build_raw_dataset("potsdam3", tmp_path, "val")


# ------------------------------------------------------------------------------------------------
# Folder


def _make_folder(root: Path, labels: bool = True) -> list[str]:
    rels = ["a/b/img1.JPG", "a/img2.png", "img3.tif", "z/img4.jpeg"]
    for k, rel in enumerate(rels):
        p = root / "images" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_rgb(k)).save(p)
        if labels:
            lab = stripes([0, 1, 2, 255]) if k != 3 else stripes([1])
            save_png(lab, (root / "labels" / rel).with_suffix(".png"))
    (root / "images" / "notes.txt").write_text("not an image")
    return rels


def test_folder_dataset_with_labels(tmp_path):
    _make_folder(tmp_path)
    ds = build_raw_dataset("folder", tmp_path, "train")
    assert len(ds) == 4 and ds.has_labels
    assert [ds.key_of(i) for i in range(4)] == ["a__b__img1", "a__img2", "img3", "z__img4"]
    assert ds.n_classes == 3 and ds.class_names == ["class 0", "class 1", "class 2"]  # max label + 1
    s = ds[0]
    assert s.image.size == (W, H) and s.image.mode == "RGB"
    assert sorted(np.unique(s.label).tolist()) == [-1, 0, 1, 2]
    (tmp_path / "classes.txt").write_text("sky\nroad\ntree\ncar\n")
    ds = build_raw_dataset("folder", tmp_path, "val")  # no split folders: every split reads root/images
    assert ds.n_classes == 4 and ds.class_names == ["sky", "road", "tree", "car"]
    (tmp_path / "labels/z/img4.png").unlink()
    with pytest.raises(DatasetLayoutError, match="missing label") as e:
        build_raw_dataset("folder", tmp_path, "train")
    assert str(tmp_path / "labels/z/img4.png") in str(e.value)


def test_folder_dataset_without_labels_and_split_folders(tmp_path):
    _make_folder(tmp_path / "train", labels=False)
    _make_folder(tmp_path / "val", labels=True)
    with pytest.raises(DatasetLayoutError, match="n_classes"):
        build_raw_dataset("folder", tmp_path, "train")
    ds = build_raw_dataset("folder", tmp_path, "train", n_classes=5)
    assert not ds.has_labels and ds.n_classes == 5 and ds[2].label is None and len(ds) == 4
    val = build_raw_dataset("folder", tmp_path, "val")
    assert val.has_labels and val.n_classes == 3
    with pytest.raises(DatasetLayoutError, match="images"):
        build_raw_dataset("folder", tmp_path / "empty", "train")
    with pytest.raises(DatasetLayoutError) as e:
        build_raw_dataset("folder", tmp_path, "test")
    assert str(tmp_path / "test" / "images") in str(e.value)


# ------------------------------------------------------------------------------------------------
# Image reading


def test_image_modes_become_rgb(tmp_path):
    g = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    cases = {
        "l.png": Image.fromarray(g, "L"),
        "la.png": Image.fromarray(np.stack([g, g], -1), "LA"),
        "rgba.png": Image.fromarray(np.dstack([random_rgb(0), g]), "RGBA"),
        "p.png": Image.fromarray(random_rgb(0)).convert("P"),
        "cmyk.tif": Image.fromarray(random_rgb(0)).convert("CMYK"),
        "f.tif": Image.fromarray(g.astype(np.float32) / 255.0, "F"),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = read_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (W, H), name
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "l.png"))[:, :, 1], g)
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "rgba.png")), random_rgb(0))
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "f.tif"))[:, :, 0], g)
    # 16 bit: scaled by the full range (65535 -> 255), not clipped at 255
    v16 = (g.astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(v16).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as im:
        assert im.mode.startswith("I")
    out = np.asarray(read_image(tmp_path / "i16.png"))
    np.testing.assert_array_equal(out[:, :, 0], g)


def test_corrupt_image_error_and_skip(tmp_path, notices):
    _make_folder(tmp_path)
    bad = tmp_path / "images/a/img2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageReadError) as e:
        read_image(bad)
    assert str(bad) in str(e.value)
    ds = build_raw_dataset("folder", tmp_path, "train")
    with pytest.raises(ImageReadError, match="img2.png"):
        ds[1]
    ds = build_raw_dataset("folder", tmp_path, "train", skip_bad_images=True)
    s = ds[1]
    assert s.key == "img3" and ds.skipped == [bad]  # the next readable image stands in
    assert [m for m in notices.messages if "img2.png" in m] == [f"skipping unreadable image {bad}: {e.value}"]
    ds[1]
    assert len([m for m in notices.messages if "img2.png" in m]) == 1  # warned once per file only
    out = prepare_five_crops(ds, tmp_path / "crops", crop_size=8)
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped"] == [str(bad)] and len(m["crops"]) == 15
    with pytest.raises(ImageReadError):
        read_label(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------------
# Five-crop preparation


def _position_dataset(root: Path, h: int = 8, w: int = 12) -> np.ndarray:
    """One h x w image whose R = row, G = column; label = row * w + column (< 255)."""
    rr, cc = np.mgrid[0:h, 0:w]
    img = np.stack([rr * 10, cc * 10, np.full_like(rr, 7)], -1).astype(np.uint8)
    save_png(img, root / "images/pos.png")
    save_png((rr * w + cc).astype(np.uint8), root / "labels/pos.png")
    (root / "classes.txt").write_text("\n".join(f"c{k}" for k in range(h * w)) + "\n")
    return img


def test_five_crop_geometry(tmp_path):
    _position_dataset(tmp_path / "src")
    raw = build_raw_dataset("folder", tmp_path / "src", "train")
    out = prepare_five_crops(raw, tmp_path / "crops", crop_size=8, crop_format="png")
    # 8x12 image -> crops of 4x6 at (top, left) = TL (0,0), TR (0,6), BL (4,0), BR (4,6), centre (2,3);
    # each resized x2 (nearest) to 8x12, centre-cropped to 8x8 -> columns 2..9 of the 8x12.
    origins = [(0, 0), (0, 6), (4, 0), (4, 6), (2, 3)]
    for k, (top, left) in enumerate(origins):
        img = np.asarray(Image.open(out / f"images/pos_{k}.png"))
        lab = np.asarray(Image.open(out / f"labels/pos_{k}.png"))
        assert img.shape == (8, 8, 3) and lab.shape == (8, 8)
        for r in range(8):
            for c in range(8):
                sr, sc = top + r // 2, left + (c + 2) // 2
                assert (img[r, c, 0], img[r, c, 1]) == (sr * 10, sc * 10), (k, r, c)
                assert lab[r, c] == sr * 12 + sc
    m = json.loads((out / "manifest.json").read_text())
    assert m["crops"] == [f"pos_{k}" for k in range(5)] and m["crop_size"] == 8
    assert m["n_source_images"] == 1 and m["has_labels"] and m["dataset"] == "folder"
    assert m["n_classes"] == 96 and m["format_version"] == 2
    assert (m["crop_rule"], m["crop_format"], m["stored_size"]) == ("five", "png", 8)

    # [ref quirk] JPEG crops are stored at their own size (4x6) and resized when read: the same
    # geometry (labels exact), the image through JPEG's loss.
    jpeg = prepare_five_crops(raw, tmp_path / "jpeg", crop_size=8)
    m = json.loads((jpeg / "manifest.json").read_text())
    assert (m["crop_rule"], m["crop_format"], m["stored_size"]) == ("five", "jpeg", "source")
    png_items, jpeg_items = TrainCrops(out, with_augmented=False), TrainCrops(jpeg, with_augmented=False)
    for k, (top, left) in enumerate(origins):
        with Image.open(jpeg / f"images/pos_{k}.jpg") as stored:
            assert stored.format == "JPEG" and stored.size == (6, 4)
        lab = np.asarray(Image.open(jpeg / f"labels/pos_{k}.png"))
        np.testing.assert_array_equal(lab, (np.mgrid[0:4, 0:6][0] + top) * 12 + np.mgrid[0:4, 0:6][1] + left)
        torch.testing.assert_close(jpeg_items[k]["label"], png_items[k]["label"], rtol=0, atol=0)
        difference = (jpeg_items[k]["image"] - png_items[k]["image"]).abs().max()
        assert 0 < difference < 20 / 255 / 0.224, difference  # JPEG's loss, a few levels


def test_prepare_idempotent_and_resumable(tmp_path):
    _make_folder(tmp_path / "src")
    raw = build_raw_dataset("folder", tmp_path / "src", "train")
    out = prepare_five_crops(raw, tmp_path / "crops", crop_size=16, crop_format="png")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == 4 * 5 * 2 + 1
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    prepare_five_crops(raw, out, crop_size=16, crop_format="png")
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes  # nothing rewritten
    # resume after losing some crops: only those are written again
    lost = [out / "images/a__img2_3.png", out / "labels/img3_0.png"]
    for p in lost:
        p.unlink()
    with pytest.raises(DatasetLayoutError, match="hpseg prepare"):
        TrainCrops(out)
    prepare_five_crops(raw, out, crop_size=16, crop_format="png")
    for p in files:
        assert p.exists()
        if p not in lost and p.name != "manifest.json":
            assert p.stat().st_mtime_ns == mtimes[p], p
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    with pytest.raises(DatasetLayoutError, match="crop_size"):
        prepare_five_crops(raw, out, crop_size=32, crop_format="png")
    with pytest.raises(DatasetLayoutError, match="crop_format: 'png' there, 'jpeg' requested"):
        prepare_five_crops(raw, out, crop_size=16)
    # threaded preparation writes the same files
    out2 = prepare_five_crops(raw, tmp_path / "crops2", crop_size=16, num_workers=2, crop_format="png")
    for p in files:
        if p.suffix == ".png":
            assert (out2 / p.relative_to(out)).read_bytes() == p.read_bytes()
    assert (
        json.loads((out2 / "manifest.json").read_text())["crops"]
        == json.loads((out / "manifest.json").read_text())["crops"]
    )


def test_train_crops(tmp_path):
    _make_folder(tmp_path / "src")
    raw = build_raw_dataset("folder", tmp_path / "src", "train")
    with pytest.raises(DatasetLayoutError, match="hpseg prepare"):
        TrainCrops(tmp_path / "crops")
    out = prepare_five_crops(raw, tmp_path / "crops", crop_size=16)
    ds = TrainCrops(out)
    assert len(ds) == 20 and ds.n_classes == 3 and ds.crop_size == 16
    torch.manual_seed(0)
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["image_aug"].shape == (3, 16, 16) and item["image_aug"].dtype == torch.float32
    assert item["label"].shape == (16, 16) and item["label"].dtype == torch.int64 and item["index"] == 0
    assert set(item["label"].unique().tolist()) == {0, 1}  # top-left crop of bands 0 | 1 | 2 | 255
    assert set(ds[1]["label"].unique().tolist()) == {-1, 2}  # top-right: 255 became -1
    assert "image_aug" not in TrainCrops(out, with_augmented=False)[0]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].shape == (4, 16, 16)


def test_train_crops_unlabelled(tmp_path):
    _make_folder(tmp_path / "src", labels=False)
    raw = build_raw_dataset("folder", tmp_path / "src", "train", n_classes=3)
    out = prepare_five_crops(raw, tmp_path / "crops", crop_size=8)
    assert not (out / "labels").exists()
    item = TrainCrops(out)[3]
    assert (item["label"] == -1).all() and item["label"].shape == (8, 8)


def test_val_crops_geometry(tmp_path):
    h, w = 6, 10
    rr, cc = np.mgrid[0:h, 0:w]
    img = np.stack([rr * 20, cc * 20, np.full_like(rr, 3)], -1).astype(np.uint8)
    save_png(img, tmp_path / "images/v.png")
    save_png((rr * w + cc).astype(np.uint8), tmp_path / "labels/v.png")
    (tmp_path / "classes.txt").write_text("\n".join(f"c{k}" for k in range(60)))
    raw = build_raw_dataset("folder", tmp_path, "val")
    ds = ValCrops(raw, size=4)
    item = ds[0]
    # 6x10 -> shorter side 4: 4x6 (long side int(4 * 10 / 6) = 6); nearest samples pixel centres:
    # rows floor((r + .5) * 1.5) = 0, 2, 3, 5; cols floor((c + .5) * 10 / 6) = 0, 2, 4, 5, 7, 9;
    # centre crop 4x4 keeps cols 1..4 -> 2, 4, 5, 7.
    rows, cols = [0, 2, 3, 5], [2, 4, 5, 7]
    expected = img[np.ix_(rows, cols)]
    assert item["rgb"].dtype == torch.uint8 and item["rgb"].shape == (3, 4, 4)
    np.testing.assert_array_equal(item["rgb"].permute(1, 2, 0).numpy(), expected)
    np.testing.assert_array_equal(item["label"].numpy(), (rr * w + cc)[np.ix_(rows, cols)])
    assert item["label"].dtype == torch.int64 and item["index"] == 0
    torch.testing.assert_close(item["image"], normalize(item["rgb"]))
    bil = ValCrops(raw, size=4, image_interpolation="bilinear")[0]
    assert not torch.equal(bil["rgb"], item["rgb"]) and torch.equal(bil["label"], item["label"])
    with pytest.raises(ValueError):
        ValCrops(raw, size=4, image_interpolation="bicubic")


# ------------------------------------------------------------------------------------------------
# Transforms, registry


def test_normalize_and_photometric():
    rgb = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    a, b = normalize(rgb), normalize(rgb.float() / 255)
    torch.testing.assert_close(a, b)
    assert a.dtype == torch.float32
    torch.testing.assert_close(
        normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8)).flatten(),
        (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]),
    )
    torch.manual_seed(0)
    aug = photometric_augment(rgb)
    assert aug.shape == rgb.shape and aug.dtype == torch.uint8
    batch = photometric_augment(rgb.expand(4, 3, 8, 8).float() / 255)
    assert batch.shape == (4, 3, 8, 8) and batch.dtype == torch.float32
    assert photometric_augment(Image.fromarray(random_rgb(0))).size == (W, H)


def test_photometric_view_hand_computed():
    """torchvision's float semantics on the normalised tensor: brightness scales and clips to [0, 1];
    greyscale is 0.2989 R + 0.587 G + 0.114 B on all three channels; skipped ops change nothing."""
    x = torch.tensor([0.9, -1.5, 0.25]).view(3, 1, 1).expand(3, 2, 2).clone()
    bright = photometric_view(x, PhotometricParams(brightness=1.2))
    torch.testing.assert_close(bright[:, 0, 0], torch.tensor([1.0, 0.0, 0.3]))
    grey = photometric_view(x, PhotometricParams(grayscale=True))
    torch.testing.assert_close(grey[:, 0, 0], torch.full((3,), 0.2989 * 0.9 - 0.587 * 1.5 + 0.114 * 0.25),
                               rtol=0, atol=1e-6)
    assert torch.equal(photometric_view(x, PhotometricParams()), x)
    # a blur of a constant image is the image (reflect padding)
    flat = torch.full((3, 6, 6), 0.4)
    torch.testing.assert_close(photometric_view(flat, PhotometricParams(blur_sigma=1.3)), flat)
    with pytest.raises(ValueError, match="permutation"):
        PhotometricParams(order=(0, 0, 1, 2))


def test_photometric_input_option(tmp_path):
    """[ref quirk] the default view is of the normalised tensor (clipped to [0, 1], not normalised
    again); photometric_input="uint8" applies the same draw to the 0..255 image, then normalises."""
    _make_folder(tmp_path / "src")
    out = prepare_five_crops(build_raw_dataset("folder", tmp_path / "src", "train"), tmp_path / "crops", crop_size=16)
    rgb = TrainCrops(out).view(1)[0]
    for where in ("normalized", "uint8"):
        torch.manual_seed(3)
        item = TrainCrops(out, photometric_input=where)[1]
        params = draw_photometric_params(torch.Generator().manual_seed(3))
        torch.testing.assert_close(item["image"], normalize(rgb))
        if where == "normalized":
            expected = photometric_view(normalize(rgb), params)
            assert 0 <= float(item["image_aug"].min()) and float(item["image_aug"].max()) <= 1
        else:
            expected = normalize(photometric_view(rgb, params))
        torch.testing.assert_close(item["image_aug"], expected)
    with pytest.raises(ValueError, match="photometric_input"):
        TrainCrops(out, photometric_input="float")


def test_whole_rule_is_the_validation_view_at_crop_size(tmp_path):
    """[ref quirk] Potsdam's default training items: the whole image resized (nearest) and
    centre-cropped to crop_size, stored losslessly, one per image of labelled_train.txt."""
    _make_folder(tmp_path / "src")
    raw = build_raw_dataset("folder", tmp_path / "src", "train")
    out = prepare_training_set(raw, tmp_path / "whole", crop_size=16, crop_rule="whole")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["crop_rule"], manifest["crop_format"], manifest["stored_size"]) == ("whole", "png", 16)
    items, val = TrainCrops(out, with_augmented=False), ValCrops(raw, size=16)
    assert items.crops == [raw.key_of(i) for i in range(len(raw))]
    for i in range(len(raw)):
        torch.testing.assert_close(items[i]["image"], val[i]["image"], rtol=0, atol=0)
        torch.testing.assert_close(items[i]["label"], val[i]["label"], rtol=0, atol=0)


def test_version_1_sets_read_as_five_png_crops(tmp_path):
    """A set prepared before the recipe was recorded is what it was: five PNG crops at crop_size."""
    _make_folder(tmp_path / "src")
    raw = build_raw_dataset("folder", tmp_path / "src", "train")
    out = prepare_five_crops(raw, tmp_path / "crops", crop_size=16, crop_format="png")
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("crop_rule", "crop_format", "stored_size"):
        del manifest[key]
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    old = TrainCrops(out, with_augmented=False)
    assert (old.manifest["crop_rule"], old.manifest["crop_format"], old.manifest["stored_size"]) == ("five", "png", 16)
    assert len(old) == 20 and old.image_path(0).suffix == ".png"
    assert prepare_five_crops(raw, out, crop_size=16, crop_format="png") == out  # complete: nothing to do


def test_training_refuses_items_made_otherwise(tmp_path):
    """A run (or a resumed run: its config comes from its checkpoint) whose config asks for other
    items than the prepared set holds stops, naming what differs."""
    _make_folder(tmp_path / "src")
    out = prepare_five_crops(build_raw_dataset("folder", tmp_path / "src", "train"), tmp_path / "crops", crop_size=16)
    manifest = TrainCrops(out).manifest
    config = Config().override(["data.dataset=folder", "data.crop_size=16"])
    check_prepared_recipe(config, manifest, out)  # the same recipe: fine
    with pytest.raises(ValueError, match=r"crop_format: 'jpeg' there, 'png' wanted.*stored_size"):
        check_prepared_recipe(config.override(["data.crop_format=png"]), manifest, out)
    with pytest.raises(ValueError, match=r"crop_size: 16 there, 32 wanted"):
        check_prepared_recipe(config.override(["data.crop_size=32"]), manifest, out)
    potsdam = Config().override(["data.dataset=potsdam3", "data.crop_size=16"])
    assert potsdam.data.crop_rule() == "whole" and potsdam.data.potsdam_lists() == "labelled"
    with pytest.raises(ValueError, match=r"crop_rule: 'five' there, 'whole' wanted"):
        check_prepared_recipe(potsdam, manifest, out)
    other = potsdam.override(["data.potsdam_train=all_five_crops"])
    assert other.data.crop_rule() == "five" and other.data.potsdam_lists() == "all"
    check_prepared_recipe(other, manifest, out)


def test_registry():
    assert DATASETS == ("cocostuff27", "cityscapes27", "potsdam3", "folder")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_raw_dataset("imagenet", ".", "train")


# ------------------------------------------------------------------- bad inputs of folder datasets


def _folder(tmp_path: Path, names: list[str]) -> Path:
    root = tmp_path / "ds"
    for i, name in enumerate(names):
        save_png(random_rgb(i), root / "images" / name)
    return root


def test_tiny_image_is_named_and_skippable(tmp_path):
    root = _folder(tmp_path, ["ok.png"])
    save_png(random_rgb(1, 1, 1), root / "images" / "tiny.png")
    raw = build_raw_dataset("folder", root, "train", n_classes=2)
    with pytest.raises(ImageReadError, match=r"tiny\.png: image of 1x1 pixels is too small"):
        prepare_five_crops(raw, tmp_path / "crops", crop_size=8)
    raw = build_raw_dataset("folder", root, "train", n_classes=2, skip_bad_images=True)
    out = prepare_five_crops(raw, tmp_path / "crops2", crop_size=8)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == [str(root / "images" / "tiny.png")]
    assert manifest["crops"] == [f"ok_{k}" for k in range(5)]


def test_symlink_loop_is_named_not_followed(tmp_path, notices):
    root = _folder(tmp_path, ["a/one.png"])
    (root / "images" / "a" / "loop").symlink_to(root / "images" / "a", target_is_directory=True)
    with pytest.raises(DatasetLayoutError, match=r"a/loop \(already read through another path"):
        build_raw_dataset("folder", root, "train", n_classes=2)
    raw = build_raw_dataset("folder", root, "train", n_classes=2, skip_bad_images=True)
    assert any("left out 1 folder" in m for m in notices.messages)
    assert [raw.path_of(i).name for i in range(len(raw))] == ["one.png"]


def test_unreadable_subfolder_stops_or_is_listed(tmp_path, monkeypatch, notices):
    root = _folder(tmp_path, ["top.png", "private/hidden.png"])
    real_scandir = os.scandir

    def scandir(path="."):
        # root can read any folder, so permission-denied is simulated where os.walk lists one.
        if Path(path).name == "private":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetLayoutError, match=r"private \(Permission denied\).*skip_bad_images"):
        build_raw_dataset("folder", root, "train", n_classes=2)
    raw = build_raw_dataset("folder", root, "train", n_classes=2, skip_bad_images=True)
    assert any("private (Permission denied)" in m for m in notices.messages)
    assert [raw.path_of(i).name for i in range(len(raw))] == ["top.png"]


def test_non_ascii_names_keep_unique_readable_keys(tmp_path):
    root = _folder(tmp_path, ["猫.png", "犬.png", "a b.png", "a_b.png"])
    raw = build_raw_dataset("folder", root, "train", n_classes=2)
    keys = {raw.path_of(i).name: raw.key_of(i) for i in range(len(raw))}
    assert keys["猫.png"] == "猫" and keys["犬.png"] == "犬"
    assert keys["a b.png"] != keys["a_b.png"]
    assert keys["a b.png"].startswith("a_b-") and keys["a_b.png"].startswith("a_b-")
    out = prepare_five_crops(raw, tmp_path / "crops", crop_size=8)
    assert (out / "images" / "猫_0.jpg").is_file()


def test_resume_on_items_made_otherwise_is_refused(tmp_path):
    """The resumed run's config (from its checkpoint) asks for JPEG crops: a prepared set cut
    again as PNG in the meantime is refused, naming the crop format."""
    from hpseg.training.trainer import resume, train
    from tests.helpers import synthetic_prepared, tiny_config

    data = synthetic_prepared(tmp_path, n_train=4, n_val=2)
    run = train(tiny_config(data, tmp_path / "runs", steps=2, extra=["train.checkpoint_interval=1"]))
    prepared = data / "hpseg_prepared" / "train_32"
    shutil.rmtree(prepared)
    prepare_five_crops(build_raw_dataset("folder", data, "train"), prepared, crop_size=32, crop_format="png")
    with pytest.raises(ValueError, match=r"made otherwise than this run's config asks \(crop_format: 'png' there"):
        resume(run)
