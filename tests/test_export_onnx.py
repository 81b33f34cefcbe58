"""ONNX export: the graph agrees with hpseg's PyTorch path (DINO-style ViT, DINOv2-style ViT with
registers, a checkpoint imported from the authors' format), the torch-free runner reproduces ``hpseg predict``, and the
documented example runs where torch cannot be imported."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import hpseg  # noqa: E402
from hpseg.backbones import create_backbone, get_spec  # noqa: E402
from hpseg.backbones.vit import dino_position_embedding  # noqa: E402
from hpseg.cli.main import main  # noqa: E402
from hpseg.data.transforms import normalize  # noqa: E402
from hpseg.export.onnx import OPSET, export_onnx, exportable_dino_position_embedding  # noqa: E402
from hpseg.export.onnx_runner import OnnxSegmenter, OnnxTiling  # noqa: E402
from hpseg.inference.segmenter import Segmenter  # noqa: E402
from hpseg.inference.tiling import Tiling, resized_shape  # noqa: E402
from hpseg.method.model import HiddenPositivesModel  # noqa: E402
from hpseg.method.probes import centroid_scores  # noqa: E402
from tests.helpers import DOCUMENTS, authors_payload, code_blocks  # noqa: E402

MAPPING = [2, 0, -1, 1]  # one cluster matched to no class: -1 must survive the graph


def _images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def dino(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Segmenter, Path]:
    """The tiny trained run (random vit_tiny_p8) with a cluster->class mapping, and its checkpoint."""
    checkpoint = tiny_run / "checkpoints" / "last.pt"
    results = tmp_path_factory.mktemp("mapping") / "results.json"
    step = torch.load(checkpoint, weights_only=True)["step"]
    results.write_text(json.dumps({"checkpoint": str(checkpoint), "step": step, "cluster_to_class": MAPPING}))
    return hpseg.load(checkpoint, device="cpu", mapping=results), results


@pytest.fixture(scope="module")
def dino_onnx(dino: tuple[Segmenter, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(dino[0], tmp_path_factory.mktemp("onnx") / "dino.onnx")


def registers_segmenter() -> Segmenter:
    """A 2-block DINOv2-style ViT (4 registers, no class pos-embed, layer scale), random heads."""
    spec = dataclasses.replace(
        get_spec("dinov2_vits14_reg"), name="tiny_dinov2_reg", patch_size=8, embed_dim=64, num_heads=4, depth=2,
        hf_hub_id="", timm_kwargs=(("patch_size", 8), ("embed_dim", 64), ("depth", 2), ("num_heads", 4),
                                   ("img_size", 32)),
    )
    backbone = create_backbone(spec, pretrained=False)
    assert backbone.num_prefix_tokens == 5
    torch.manual_seed(1)
    model = HiddenPositivesModel(64, 16, 5)
    return Segmenter(model, backbone, class_names=[f"c{k}" for k in range(5)], tiling=Tiling.create(32, None, 8),
                     device=torch.device("cpu"), cluster_to_class=[4, 3, 2, 1, 0], mapping_source="test")


def _torch_outputs(segmenter: Segmenter, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """hpseg's own path on (B, H, W, 3) images: cluster logits, linear logits, mapped cluster labels."""
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    with torch.no_grad():
        s = segmenter.model.segmentation(segmenter.backbone(x).features)
        cluster = centroid_scores(s, segmenter.model.cluster_probe.centroids, cosine=False)
        linear = segmenter.model.linear_probe(s)
    whole = dataclasses.replace(segmenter.tiling, size=0, window=0)
    segmenter.tiling, kept = whole, segmenter.tiling
    try:
        labels = np.stack([segmenter.segment(image) for image in images])
    finally:
        segmenter.tiling = kept
    return cluster.numpy(), linear.numpy(), labels


def test_exportable_position_embedding_is_dinos() -> None:
    """The matrix form of DINO's bicubic scale-factor interpolation gives DINO's numbers at many
    grids (shrunk, enlarged, non-square, one patch; the native grid untouched, bit for bit)."""
    pos_embed = torch.randn(1, 1 + 16, 24, generator=torch.Generator().manual_seed(0))
    for grid in [(4, 4), (2, 3), (8, 5), (1, 1), (1, 9), (12, 12), (5, 4), (37, 3)]:
        expected = dino_position_embedding(pos_embed, grid)
        got = exportable_dino_position_embedding(pos_embed, grid)
        assert got.shape == expected.shape == (1, 1 + grid[0] * grid[1], 24)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(exportable_dino_position_embedding(pos_embed, (4, 4)), pos_embed)
    # Resizing to the grid (scale = grid / native) is a different function: the test can tell.
    assert not torch.allclose(exportable_dino_position_embedding(pos_embed, (8, 5))[:, 1:].reshape(8, 5, 24),
                              torch.nn.functional.interpolate(pos_embed[:, 1:].reshape(1, 4, 4, 24).permute(0, 3, 1, 2),
                                                              size=(8, 5), mode="bicubic")[0].permute(1, 2, 0),
                              atol=1e-3)


def imported_reference(folder: Path) -> tuple[Segmenter, Path]:
    """The authors' format (a tiny ViT the converter infers as vit_tiny_p8, random heads, no
    mapping) through ``hpseg import-checkpoint`` and ``hpseg export --format onnx``: the
    segmenter of the converted checkpoint and the .onnx file."""
    torch.save(authors_payload(seed=4), folder / "reference.pth")
    imported, path = folder / "imported.pt", folder / "reference.onnx"
    assert main(["import-checkpoint", str(folder / "reference.pth"), "--out", str(imported), "--dataset", "folder"]) == 0
    assert main(["export", str(imported), "--format", "onnx", "--out", str(path)]) == 0
    return hpseg.load(imported, device="cpu"), path


@pytest.mark.parametrize("kind", ["dino", "registers", "reference"])
def test_graph_agrees_with_pytorch_at_several_sizes(kind: str, dino: tuple[Segmenter, Path], dino_onnx: Path,
                                                    tmp_path: Path) -> None:
    if kind == "dino":
        segmenter, path = dino[0], dino_onnx
    elif kind == "registers":
        segmenter = registers_segmenter()
        path = export_onnx(segmenter, tmp_path / f"{kind}.onnx")
    else:
        segmenter, path = imported_reference(tmp_path)
        assert segmenter.backbone.spec.name == "vit_tiny_p8" and segmenter.cluster_to_class is None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Batch and both sides vary, including grids smaller and larger than the native 4x4.
    for shape in [(2, 32, 48, 3), (1, 64, 40, 3), (3, 8, 16, 3), (1, 96, 72, 3)]:
        images = _images(shape, seed=shape[1])
        cluster, linear, labels = _torch_outputs(segmenter, images)
        got = dict(zip(["cluster_logits", "linear_logits", "cluster_labels", "linear_labels"],
                       session.run(None, {"image": np.ascontiguousarray(images.transpose(0, 3, 1, 2))})))
        assert got["cluster_logits"].shape == cluster.shape == (shape[0], segmenter.n_clusters,
                                                                 shape[1] // 8, shape[2] // 8)
        np.testing.assert_allclose(got["cluster_logits"], cluster, rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["linear_logits"], linear, rtol=0, atol=1e-4)
        assert got["cluster_labels"].shape == labels.shape and got["cluster_labels"].dtype == np.int64
        assert (got["cluster_labels"] == labels).mean() >= 0.999
        upsampled = torch.nn.functional.interpolate(torch.from_numpy(linear), size=shape[1:3], mode="bilinear",
                                                    align_corners=False).argmax(1).numpy()
        assert (got["linear_labels"] == upsampled).mean() >= 0.999
    if segmenter.cluster_to_class is not None:
        assert set(np.unique(got["cluster_labels"])) <= set(segmenter.cluster_to_class)


def test_metadata_states_the_contract(dino: tuple[Segmenter, Path], dino_onnx: Path) -> None:
    import onnx

    model = onnx.load(str(dino_onnx))
    assert model.opset_import[0].version == OPSET
    props = {p.key: p.value for p in model.metadata_props}
    info = json.loads(props["hpseg"])
    assert "uint8 NCHW RGB 0..255" in props["input_contract"] and "multiples of the patch size 8" in props["input_contract"]
    assert info["input"]["dtype"] == "uint8" and "0.485" in info["input"]["normalisation"]
    assert info["tiling"] == {"size": 32, "window": 32, "patch": 8}
    assert info["cluster_to_class"] == MAPPING and info["class_names"] == dino[0].class_names
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # dynamic B, H, W


def test_runner_reproduces_the_tiled_pytorch_path(dino: tuple[Segmenter, Path], dino_onnx: Path) -> None:
    segmenter = dino[0]
    runner = OnnxSegmenter(dino_onnx)
    assert runner.tiling == OnnxTiling(32, 32, 8) and runner.cluster_to_class == MAPPING
    agree = []
    for i, shape in enumerate([(37, 53), (200, 90), (32, 32), (5, 3), (64, 150)]):
        image = _images((*shape, 3), seed=i)
        for head in ("cluster", "linear"):
            expected, got = segmenter.segment(image, head=head), runner.segment(Image.fromarray(image), head=head)
            assert got.shape == expected.shape == shape
            agree.append((got == expected).mean())
        if shape == (32, 32):  # no resize: the averaged logits are the graph's, to float precision
            np.testing.assert_allclose(runner.scores(image)[0], segmenter.scores(image)[0].numpy(), atol=1e-4)
    assert min(agree) >= 0.999
    with pytest.raises(ValueError, match="CRF"):
        runner.segment(_images((8, 8, 3)), crf=True)


def test_runner_geometry_is_predicts() -> None:
    """The torch-free copy of the tiling equals hpseg.inference.tiling's on many shapes."""
    for size, window, patch in [(32, None, 8), (320, None, 8), (0, 0, 14), (224, 112, 16)]:
        ours = Tiling.create(size, window, patch)
        copy = OnnxTiling(ours.size, ours.window, ours.patch)
        for height, width in [(1, 1), (37, 53), (500, 333), (224, 224), (1000, 31)]:
            resized = resized_shape(height, width, size)
            assert copy.resized(height, width) == resized
            padded = ours.padded(*resized)
            assert copy.padded(*resized) == padded and copy.windows(*padded) == ours.windows(*padded)


def test_predict_onnx_writes_what_predict_writes(dino: tuple[Segmenter, Path], dino_onnx: Path, tmp_path: Path,
                                                 tiny_images: Path) -> None:
    checkpoint = dino[0].checkpoint
    assert main(["predict", str(tiny_images), "--checkpoint", checkpoint, "--mapping", str(dino[1]),
                 "--out", str(tmp_path / "torch"), "--no-progress"]) == 0
    assert main(["predict", str(tiny_images), "--onnx", str(dino_onnx), "--out", str(tmp_path / "onnx"),
                 "--no-progress"]) == 0
    files = sorted((tmp_path / "torch" / "labels").rglob("*.png"))
    assert len(files) == 4
    for file in files:
        a = np.array(Image.open(file))
        b = np.array(Image.open(tmp_path / "onnx" / "labels" / file.relative_to(tmp_path / "torch" / "labels")))
        assert a.shape == b.shape and (a == b).mean() >= 0.999
    summary = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert summary["checkpoint"] == str(dino_onnx) and summary["values"].startswith("class ids")
    assert main(["predict", str(tiny_images), "--onnx", str(dino_onnx), "--crf", "--out", str(tmp_path / "x")]) == 2


@pytest.fixture
def tiny_images(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, shape in enumerate([(37, 53), (64, 40), (90, 120), (32, 32)]):
        Image.fromarray(_images((*shape, 3), seed=10 + i)).save(folder / f"photo{i}.jpg", quality=95)
    return folder


def _only_numpy_pillow_onnxruntime(folder: Path) -> Path:
    """A folder holding links to numpy, Pillow and onnxruntime (and their shared libraries) only:
    with ``python -S`` and it as PYTHONPATH, the packages a user's bare venv would have."""
    import PIL

    folder.mkdir()
    site = Path(np.__file__).resolve().parent.parent
    for module in (np, PIL, ort):
        package = Path(module.__file__).resolve().parent
        (folder / package.name).symlink_to(package)
    for libs in ("numpy.libs", "pillow.libs"):  # manylinux wheels' vendored libraries
        if (site / libs).is_dir():
            (folder / libs).symlink_to(site / libs)
    return folder


def test_readme_example_runs_as_written_without_hpseg(dino: tuple[Segmenter, Path], dino_onnx: Path,
                                                      tmp_path: Path, tiny_images: Path) -> None:
    """The documented onnxruntime example (docs/deployment.md), exactly as a user runs it (issue 22: it imported hpseg,
    and copying the runner beside it did not help): the script and the runner file side by side,
    ``python -S segment.py`` where only numpy, Pillow and onnxruntime can be imported."""
    import hpseg.export.onnx_runner as runner

    example = next(body for document in DOCUMENTS for language, body in code_blocks(document.read_text())
                   if language == "python" and "OnnxSegmenter" in body)
    model = re.search(r'OnnxSegmenter\("([^"]+)"\)', example)
    folder = re.search(r'Path\("([^"]+)"\)', example)
    assert model is not None and folder is not None
    (tmp_path / model.group(1)).write_bytes(dino_onnx.read_bytes())
    if folder.group(1) != "photos":
        tiny_images.rename(tmp_path / folder.group(1))
    (tmp_path / "segment.py").write_text(example)
    (tmp_path / Path(runner.__file__).name).write_bytes(Path(runner.__file__).read_bytes())  # "copy it beside"
    site = _only_numpy_pillow_onnxruntime(tmp_path / "bare-venv")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    probe = subprocess.run([sys.executable, "-S", "-c", "import hpseg"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
    assert "No module named 'hpseg'" in probe.stderr  # the environment has no hpseg (nor torch)
    done = subprocess.run([sys.executable, "-S", "segment.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cluster" in done.stdout or "[" in done.stdout  # print(model.label_names("cluster"))
    written = sorted((tmp_path / folder.group(1)).glob("*.labels.png"))
    assert len(written) == 4
    for file in written:
        source = Image.open(file.with_name(file.name.replace(".labels.png", ".jpg")))
        expected = dino[0].segment(source)
        got = np.array(Image.open(file)).astype(np.int64)
        got[got == 255] = -1
        assert got.shape == expected.shape and (got == expected).mean() >= 0.999


def _with_metadata(source: Path, target: Path, edit: Any) -> Path:
    """A copy of the ONNX model ``source`` whose ``hpseg`` metadata is ``edit(text)`` (None: removed)."""
    import onnx

    model = onnx.load(str(source))
    props = {prop.key: prop.value for prop in model.metadata_props}
    text = edit(props["hpseg"])
    del model.metadata_props[:]
    for key, value in props.items():
        if key != "hpseg" or text is not None:
            prop = model.metadata_props.add()
            prop.key, prop.value = key, (text if key == "hpseg" else value)
    onnx.save(model, str(target))
    return target


def _edit_json(change: Any) -> Any:
    def edit(text: str) -> str:
        info = json.loads(text)
        change(info)
        return json.dumps(info)
    return edit


@pytest.mark.parametrize(("edit", "message"), [
    (lambda text: text[: len(text) // 2], "its 'hpseg' metadata is not valid JSON"),
    (lambda text: "[1, 2]", "its 'hpseg' metadata is not a JSON object"),
    (lambda text: None, "has no 'hpseg' metadata"),
    (_edit_json(lambda info: info.pop("tiling")), "no 'tiling' mapping (size, window, patch)"),
    (_edit_json(lambda info: info["tiling"].update(patch="8")), "'tiling.patch' is '8', expected an integer >= 1"),
    (_edit_json(lambda info: info["tiling"].update(size=-5)), "'tiling.size' is -5, expected an integer >= 0"),
    (_edit_json(lambda info: info.update(n_clusters=True)), "'n_clusters' is True, expected an integer >= 1"),
    (_edit_json(lambda info: info.update(class_names="sky")), "'class_names' is not a list of names"),
    (_edit_json(lambda info: info["label_names"].pop("linear")), "'label_names' is not a mapping"),
    (_edit_json(lambda info: info.update(cluster_to_class=[0, 99, 0, 0])), "'cluster_to_class' is not a list"),
])
def test_damaged_metadata_is_named_by_predict_onnx(edit: Any, message: str, dino_onnx: Path, tiny_images: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Metadata that was not JSON, or lacked ``tiling``, was a traceback through ``predict --onnx``."""
    from hpseg.export.onnx_runner import OnnxModelError

    damaged = _with_metadata(dino_onnx, tmp_path / "damaged.onnx", edit)
    with pytest.raises(OnnxModelError, match=re.escape(message)):
        OnnxSegmenter(damaged)
    status = main(["predict", str(tiny_images), "--onnx", str(damaged), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert f"hpseg predict: error: {damaged}: " in err or f"hpseg predict: error: {damaged} has no" in err
    assert message in err


def test_export_replaces_only_a_model_an_export_wrote(dino_onnx: Path, tmp_path: Path) -> None:
    """The --out rule for the one file of an ONNX export (docs/outputs.md)."""
    from hpseg.export.onnx import check_destination
    from hpseg.files import OutputFolderError

    assert check_destination(dino_onnx) == dino_onnx and check_destination(tmp_path / "new.onnx") == tmp_path / "new.onnx"
    foreign = _with_metadata(dino_onnx, tmp_path / "foreign.onnx", lambda text: None)  # an ONNX model, not hpseg's
    with pytest.raises(OutputFolderError, match=f"--out {foreign} exists and is not an ONNX model written by"):
        check_destination(foreign)


def test_clear_errors(tmp_path: Path, dino: tuple[Segmenter, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxSegmenter(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.onnx"):
        OnnxSegmenter(tmp_path / "junk.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed
    with pytest.raises(ImportError, match=re.escape('pip install "hpseg[onnx]"')):
        export_onnx(dino[0], tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()
