"""The Python API (hpseg.load / Segmenter) and the resize-and-tile geometry it shares with predict."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import hpseg
from hpseg.backbones import BackboneWeightsError, create_backbone
from hpseg.checkpoints.mapping import evaluation_dir, find_mapping
from hpseg.checkpoints.payload import CheckpointPayload
from hpseg.checkpoints.sources import Source, SourceKind
from hpseg.checkpoints.store import FORMAT, CheckpointError
from hpseg.checkpoints.trained import inference_dtype, load_trained
from hpseg.cli.main import main
from hpseg.config import Config
from hpseg.data import ValCrops, build_raw_dataset
from hpseg.evaluation.protocol import evaluate_model, validation_loader
from hpseg.inference.label_maps import label_maps
from hpseg.inference.tiling import (
    Tiling,
    resample,
    resample_argmax,
    resized_shape,
    tile_and_average_many,
    window_starts,
)
from hpseg.runtime import DistributedContext


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def segmenter(run_dir: Path) -> hpseg.Segmenter:
    return hpseg.load(run_dir / "checkpoints" / "last.pt", device="cpu")


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------ geometry


def test_resample_matches_interpolate_and_bands_match_whole() -> None:
    scores = torch.randn(5, 4, 7)
    for size in [(32, 56), (3, 5), (4, 7), (37, 11)]:
        expected = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(resample(scores, size), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(resample_argmax(scores, size, max_elements=7), expected.argmax(0))


def test_window_geometry_covers_every_patch_once_or_more() -> None:
    assert window_starts(32, 64, 16) == [0]
    assert window_starts(100, 40, 24) == [0, 24, 48, 60]
    tiling = Tiling.create(size=320, window=None, patch=8)
    assert tiling.window == 320 and tiling.stride(320) % 8 == 0
    (wh, ww), offsets = tiling.windows(320, 480)
    assert (wh, ww) == (320, 320) and all(t % 8 == 0 and left % 8 == 0 for t, left in offsets)
    covered = np.zeros((320, 480), bool)
    for t, left in offsets:
        covered[t : t + wh, left : left + ww] = True
    assert covered.all()
    assert resized_shape(37, 53, 32) == (32, 45) and resized_shape(53, 37, 32) == (45, 32)
    assert resized_shape(37, 53, 0) == (37, 53)
    assert Tiling.create(size=30, window=None, patch=8).window == 32  # rounded up to whole patches



def test_tiling_many_images_shares_calls_and_averages_each_image_on_its_own() -> None:
    """Per-patch means as ``compute``: every window gives the patch means of the pixels it
    covers, so each image's average must be its own patch means, whatever the batching."""
    tiling = Tiling.create(size=0, window=16, patch=4)
    shapes = [(16, 16), (16, 28), (8, 8), (8, 8), (40, 16), (12, 20)]  # 1, 3, 1, 1, 4, 2 windows
    images = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(shapes)]
    calls: list[tuple[int, ...]] = []

    def patch_means(windows: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(windows.shape))
        return F.avg_pool2d(windows, 4)

    pulled: list[int] = []

    def stream():
        for index, image in enumerate(images):
            pulled.append(index)
            yield image

    grids = []
    for grid in tile_and_average_many(stream(), tiling, patch_means, batch_size=3):
        grids.append(grid)
        assert len(pulled) <= len(grids) + 3  # read lazily: only the images of the current call
    assert len(grids) == len(images)
    for image, grid in zip(images, grids):
        torch.testing.assert_close(grid, F.avg_pool2d(image[None], 4)[0], rtol=1e-6, atol=1e-6)
    # windows of several images per call; a call ends where the window shape changes, or at 3
    assert calls == [(3, 3, 16, 16), (1, 3, 16, 16), (2, 3, 8, 8), (3, 3, 16, 16), (1, 3, 16, 16), (2, 3, 12, 16)]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        list(tile_and_average_many([torch.rand(3, 10, 12)], tiling, patch_means))


@pytest.mark.parametrize(("size", "window"), [(None, None), (0, 16)])  # the checkpoint's 32 px; sizes kept, 16 px windows
def test_segment_many_gives_the_label_maps_of_segment(run_dir: Path, size: int | None, window: int | None) -> None:
    segmenter = hpseg.load(run_dir / "checkpoints" / "last.pt", device="cpu", size=size, window=window, batch_size=3)
    shapes = [(37, 53), (5, 3), (200, 40), (64, 64), (24, 24), (33, 90), (16, 16)]  # wide, tiny, tall, square
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)]
    for head in ("cluster", "linear"):
        many = list(segmenter.segment_many(iter(images), head=head))
        assert len(many) == len(images)
        for image, labels in zip(images, many):
            assert labels.shape == image.shape[:2] and labels.dtype == np.int64
            assert np.array_equal(labels, segmenter.segment(image, head=head))
    assert list(segmenter.segment_many([])) == []
    if size is None and importlib.util.find_spec("pydensecrf") is not None:  # the CRF, image by image after the passes
        for image, labels in zip(images[:3], segmenter.segment_many(images[:3], crf=True)):
            assert np.array_equal(labels, segmenter.segment(image, crf=True))
    with pytest.raises(ValueError, match="head"):
        segmenter.segment_many(images, head="kmeans")


# ------------------------------------------------------------------------------------ inputs


def test_segment_accepts_pil_numpy_and_tensors_at_their_size(segmenter: hpseg.Segmenter) -> None:
    array = _image(37, 53)
    expected = segmenter.segment(array)
    assert expected.shape == (37, 53) and expected.dtype == np.int64
    assert expected.min() >= 0 and expected.max() < segmenter.n_clusters
    same = [
        Image.fromarray(array),
        torch.from_numpy(array).permute(2, 0, 1),  # (3, H, W) uint8
        torch.from_numpy(array).permute(2, 0, 1).float() / 255.0,  # (3, H, W) float in [0, 1]
        np.dstack([array, np.full((37, 53), 7, np.uint8)]),  # RGBA array: alpha dropped
    ]
    for image in same:
        assert np.array_equal(segmenter.segment(image), expected)
    gray = Image.fromarray(array[:, :, 0], "L")
    assert segmenter.segment(gray).shape == (37, 53)
    assert segmenter.segment(gray.convert("RGBA"), head="linear").shape == (37, 53)
    for shape in [(5, 3), (200, 40), (64, 64)]:  # tiny, tall (several windows), square
        assert segmenter.segment(_image(*shape)).shape == shape
    with pytest.raises(ValueError, match="head"):
        segmenter.segment(array, head="kmeans")
    with pytest.raises((TypeError, ValueError)):
        segmenter.segment("not an image")


def test_single_window_equals_the_evaluation_label_maps(segmenter: hpseg.Segmenter, run_dir: Path) -> None:
    config = Config.from_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["config"])
    validation = ValCrops(build_raw_dataset("folder", config.data.root, "val"), size=config.data.val_size)
    item = validation[0]
    maps = label_maps(segmenter.model, segmenter.backbone(item["image"][None]).features, tuple(item["label"].shape))
    assert np.array_equal(segmenter.segment(item["rgb"]), maps.clusters[0].numpy())
    assert np.array_equal(segmenter.segment(item["rgb"], head="linear"), maps.classes[0].numpy())


def test_features_are_the_backbone_and_head_outputs(segmenter: hpseg.Segmenter) -> None:
    array = _image(32, 32, seed=3)  # one window, no resize: the plain forward pass
    out = segmenter.features(array)
    normalised = (torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
                  - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    f = segmenter.backbone(normalised[None]).features
    torch.testing.assert_close(out.backbone, f[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.segmentation, segmenter.model.segmentation(f)[0], rtol=1e-4, atol=1e-4)
    big = segmenter.features(_image(37, 90))
    assert big.resized_size == (32, 77) and big.backbone.shape == (64, 4, 10) and big.segmentation.shape[1:] == (4, 10)


# ------------------------------------------------------------------------------------ loading


def test_random_backbone_is_rebuilt_exactly(run_dir: Path) -> None:
    """The checkpoint's validation metrics are reproduced: same random backbone as in training."""
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    config = Config.from_dict(best["config"])
    segmenter = hpseg.load(run_dir / "checkpoints" / "best.pt", device="cpu")
    validation = ValCrops(build_raw_dataset("folder", config.data.root, "val"), size=config.data.val_size)
    loader = validation_loader(validation, 16, 0, DistributedContext(), config.train.val_max_images)
    results = evaluate_model(segmenter.model, segmenter.backbone, loader, config.method.n_classes, torch.device("cpu"))
    for key in ("unsupervised_accuracy", "linear_accuracy"):
        assert results.metrics()[key] == pytest.approx(best["metrics"][key], abs=1e-9)


def test_mapping_gives_class_ids_and_names(run_dir: Path, tmp_path: Path) -> None:
    checkpoint = run_dir / "checkpoints" / "last.pt"
    payload = torch.load(checkpoint, weights_only=True)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"checkpoint": str(checkpoint), "step": payload["step"], "cluster_to_class": [2, 0, 3, 1]}))
    plain = hpseg.load(checkpoint, device="cpu")
    mapped = hpseg.load(checkpoint, device="cpu", mapping=results)
    image = _image(40, 24, seed=5)
    assert np.array_equal(mapped.segment(image), np.array([2, 0, 3, 1])[plain.segment(image)])
    assert mapped.label_names("cluster") == plain.class_names == mapped.class_names
    assert plain.label_names("cluster") == [f"cluster {k}" for k in range(4)]
    results.write_text(json.dumps({"step": payload["step"] + 1, "cluster_to_class": [0, 1, 2, 3]}))
    with pytest.raises(ValueError, match="step"):
        hpseg.load(checkpoint, device="cpu", mapping=results)
    results.write_text(json.dumps({"cluster_to_class": [0, 1]}))
    with pytest.raises(ValueError, match="4 integers"):
        hpseg.load(checkpoint, device="cpu", mapping=results)


def test_load_refuses_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        hpseg.load(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="other.pt"):
        hpseg.load(other)
    with pytest.raises(CheckpointError, match="does not exist"):
        hpseg.load(tmp_path / "missing.pt")


def _copy_checkpoint(run_dir: Path, to: Path, **changes: object) -> Path:
    """The tiny run's last.pt saved at ``to`` with top-level entries replaced by ``changes``."""
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    payload.update(changes)
    to.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, to)
    return to


def test_inference_precision_follows_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [inference_dtype(amp, cpu) for amp in ("auto", "fp16", "bf16", "none")] == [None, None, torch.bfloat16, None]
    assert [inference_dtype(amp, cuda) for amp in ("auto", "fp16", "bf16", "none")] == [
        torch.float16, torch.float16, torch.bfloat16, None]


def test_a_checkpoint_trained_in_float16_loads_on_the_cpu(run_dir: Path, tmp_path: Path,
                                                          segmenter: hpseg.Segmenter) -> None:
    """Defect: ``hpseg.load(device="cpu")`` raised "amp=fp16 needs a CUDA device"."""
    config = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["config"]
    config["train"]["amp"] = "fp16"
    path = _copy_checkpoint(run_dir, tmp_path / "run" / "checkpoints" / "last.pt", config=config)
    on_cpu = hpseg.load(path, device="cpu")
    assert on_cpu.amp_dtype is None  # float32: the CPU has no float16 autocast
    image = _image(40, 24, seed=2)
    assert np.array_equal(on_cpu.segment(image), segmenter.segment(image))


def test_loading_leaves_the_callers_random_numbers_alone(run_dir: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    hpseg.load(run_dir / "checkpoints" / "last.pt", device="cpu")
    assert torch.equal(torch.rand(4), expected)


def test_evaluation_dir_is_beside_the_checkpoint() -> None:
    assert evaluation_dir(Path("/runs/r1/checkpoints/best.pt")) == Path("/runs/r1/eval-best")
    assert evaluation_dir(Path("/runs/r1/checkpoints/last.pt"), crf=True) == Path("/runs/r1/eval-last-crf")
    assert evaluation_dir(Path("/models/hp.pt")) == Path("/models/eval-hp")
    assert evaluation_dir(Path("hp.pt"), crf=True) == Path("eval-hp-crf")


def test_find_mapping_prefers_the_evaluation_with_the_same_crf_setting(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    plain, crf = tmp_path / "run" / "eval-last" / "results.json", tmp_path / "run" / "eval-last-crf" / "results.json"
    assert find_mapping(checkpoint, 6) is None
    for path in (plain, crf):
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"checkpoint": str(checkpoint), "step": 6, "cluster_to_class": [0, 1]}))
    assert find_mapping(checkpoint, 6) == plain and find_mapping(checkpoint, 6, crf=True) == crf
    assert find_mapping(checkpoint, 7) is None  # recorded for another step
    plain.unlink()
    assert find_mapping(checkpoint, 6) == crf  # the other setting's when that is all there is


def _moved_checkpoint(run_dir: Path, folder: Path) -> Path:
    """The tiny run's checkpoint as if trained on a weights file that moved with it into ``folder``."""
    weights = folder / "backbone.safetensors"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in create_backbone("vit_tiny_p8", pretrained=False).model.state_dict().items()},
              str(weights))
    recorded = {"name": "vit_tiny_p8", "weights": "/gone/elsewhere/backbone.safetensors", "pretrained": True}
    return _copy_checkpoint(run_dir, folder / "hp.pt", backbone=recorded)


def test_weights_beside_a_moved_checkpoint_serve_load_and_eval(run_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = _moved_checkpoint(run_dir, tmp_path / "models")
    assert load_trained(checkpoint, "cpu").weights_source == str(tmp_path / "models" / "backbone.safetensors")
    assert main(["--quiet", "eval", str(checkpoint), "--device", "cpu"]) == 0
    capsys.readouterr()
    (tmp_path / "models" / "backbone.safetensors").unlink()
    with pytest.raises(BackboneWeightsError, match=r"hp.pt.*/gone/elsewhere/backbone.safetensors.*--weights"):
        load_trained(checkpoint, "cpu")


def test_eval_of_a_checkpoint_outside_a_run_writes_beside_it(run_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Defect: ``hpseg eval /models/hp.pt`` wrote to ``/eval-imported``."""
    checkpoint = _copy_checkpoint(run_dir, tmp_path / "models" / "hp.pt", kind="imported")
    assert main(["--quiet", "eval", str(checkpoint), "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "models" / "eval-hp" / "results.json").read_text())
    assert results["checkpoint"] == str(checkpoint) and results["checkpoint_kind"] == "imported"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    assert f"{tmp_path / 'models' / 'eval-hp'}/results.json" in capsys.readouterr().out
    # ... where hpseg.load finds its mapping again.
    assert hpseg.load(checkpoint, device="cpu", mapping="auto").cluster_to_class == results["cluster_to_class"]


@pytest.mark.parametrize(("recorded", "expected"), [
    ({"name": "dino_vits8", "pretrained": True}, "dino_vits8_800ep"),  # written before the switch
    ({"name": "dino_vits8", "pretrained": True, "official_weights": "https://dl.fbaipublicfiles.com/x.pth"},
     "dino_vits8"),
    ({"name": "dino_vits16", "pretrained": True}, "dino_vits16"),  # its file never changed
])
def test_official_weights_are_those_the_checkpoint_was_trained_on(recorded, expected, monkeypatch, tmp_path,
                                                                   notices) -> None:
    """A dino_vits8 checkpoint that records no official_weights was trained on the 800-epoch file
    (hpseg's dino_vits8 before it became the paper's 300-epoch one): that is the one rebuilt."""
    from hpseg.checkpoints import trained

    built = []
    monkeypatch.setattr(trained, "create_backbone", lambda name, **kwargs: built.append((name, kwargs)) or "bb")
    config = Config()
    config.backbone.name = recorded["name"]
    payload = CheckpointPayload.from_dict({"format": FORMAT, "config": config.to_dict(), "model": {},
                                           "backbone": recorded}, tmp_path / "old.pt")
    checkpoint = trained.TrainedCheckpoint(Source(SourceKind.FILE, tmp_path / "old.pt", "old.pt"), payload)
    assert trained.resolve_backbone(checkpoint) == ("bb", "official")
    assert built == [(expected, {"pretrained": True})]
    assert ("300-epoch" in " ".join(notices.messages)) == (expected != recorded["name"])
