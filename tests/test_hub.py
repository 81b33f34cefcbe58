"""The Hugging Face Hub folder: export, load back (folder and hf:// through an offline cache in
the hub's own layout), predict from hf://, and the commit ``hpseg push`` would make."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpseg.files import OUTPUT_MARKER

pytest.importorskip("huggingface_hub")

import hpseg  # noqa: E402
from hpseg.cli.main import main  # noqa: E402
from hpseg.export.hub import export_hub, push, push_operations  # noqa: E402
from tests.helpers import authors_payload  # noqa: E402

MAPPING = [3, 1, 0, 2]
SHA = "0123456789abcdef0123456789abcdef01234567"


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def run_with_eval(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run with an evaluation of its last checkpoint where `hpseg eval` puts it."""
    run = tmp_path_factory.mktemp("hub") / "run"
    shutil.copytree(tiny_run, run)
    checkpoint = run / "checkpoints" / "last.pt"
    step = torch.load(checkpoint, weights_only=True)["step"]
    (run / "eval-last").mkdir()
    (run / "eval-last" / "results.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "checkpoint_kind": "last", "step": step, "crf": False, "dataset": "folder",
        "n_images": 4, "selection": "last step", "cluster_to_class": MAPPING,
        "hp": {"unsupervised_accuracy": 0.5, "unsupervised_miou": 0.25, "linear_accuracy": 0.75, "linear_miou": 0.5},
    }))
    return run


@pytest.fixture(scope="module")
def folder(run_with_eval: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hp-tiny"
    assert main(["export", str(run_with_eval / "checkpoints" / "last.pt"), "--format", "hub", "--out", str(out)]) == 0
    return out


def test_folder_holds_config_heads_backbone_and_card(folder: Path) -> None:
    from safetensors.torch import load_file

    assert sorted(p.name for p in folder.iterdir()) == [".hpseg-output.json", "README.md", "backbone.safetensors",
                                                         "config.json", "model.safetensors"]  # the marker is not pushed
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "hpseg-hub" and config["cluster_to_class"] == MAPPING
    # A random backbone is not "official": its weights travel in safetensors.
    assert config["backbone"]["name"] == "vit_tiny_p8" and config["backbone"]["weights"] == "backbone.safetensors"
    assert len(config["colours"]) == len(config["class_names"]) == 4
    evaluation = config["evaluation"]
    assert evaluation["metrics"]["linear_accuracy"] == 0.75 and evaluation["selection"] == "last step"
    assert evaluation["source"].startswith("hpseg eval")
    heads = load_file(str(folder / "model.safetensors"))
    assert heads["cluster_probe.centroids"].shape == (4, 16)
    card = (folder / "README.md").read_text()
    for needed in ("library_name: hpseg", "| linear accuracy | 75.00 |", "hpseg.load(", "@inproceedings",
                   "Licence", "randomly initialised"):
        assert needed in card, needed


def test_folder_round_trips(folder: Path, run_with_eval: Path) -> None:
    original = hpseg.load(run_with_eval / "checkpoints" / "last.pt", device="cpu", mapping="auto")
    loaded = hpseg.load(folder, device="cpu", mapping="auto")
    assert loaded.cluster_to_class == MAPPING == original.cluster_to_class
    assert loaded.tiling == original.tiling and loaded.class_names == original.class_names
    for i, shape in enumerate([(37, 53), (80, 32)]):
        image = _image(*shape, seed=i)
        for head in ("cluster", "linear"):
            assert np.array_equal(loaded.segment(image, head=head), original.segment(image, head=head))
    raw = hpseg.load(folder, device="cpu")  # mapping=None: raw cluster ids, as for a checkpoint file
    assert raw.cluster_to_class is None


def test_authors_checkpoint_exports_with_its_backbone(tmp_path: Path) -> None:
    authors = tmp_path / "authors.pth"
    torch.save(authors_payload(seed=2), authors)
    out = tmp_path / "hub"
    written = export_hub(authors, out)
    # Every file but the hidden output marker (--out rule, hpseg.files) is listed to the user.
    assert sorted(p.name for p in written) == sorted(p.name for p in out.iterdir() if p.name != OUTPUT_MARKER)
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"]["weights"] == "backbone.safetensors" and (out / "backbone.safetensors").is_file()
    assert config["checkpoint"]["selection"].startswith("imported from the authors'")
    # The card is published: it names the file the weights came from, never a local path.
    card = (out / "README.md").read_text()
    assert "authors.pth" in card and str(tmp_path) not in card
    image = _image(40, 48)
    direct = hpseg.load(authors, device="cpu")
    assert np.array_equal(hpseg.load(out, device="cpu").segment(image), direct.segment(image))


def _populate_cache(cache: Path, folder: Path, repo: str) -> None:
    """The Hub cache layout: models--owner--name/{blobs, snapshots/<sha>/..., refs/main}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)
    shutil.copytree(folder, root / "snapshots" / SHA)


def test_hf_reference_loads_offline_from_the_cache(folder: Path, tmp_path: Path, run_with_eval: Path) -> None:
    """In a fresh process (HF_HUB_CACHE and HF_HUB_OFFLINE read as the library reads them):
    `hpseg predict --checkpoint hf://...` from the cache, same label maps as the checkpoint."""
    cache = tmp_path / "cache"
    _populate_cache(cache, folder, "someone/hp-tiny")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_image(37, 53)).save(photos / "a.png")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(hpseg.__file__).resolve().parent.parent)}
    references = ("hf://someone/hp-tiny", f"hf://someone/hp-tiny@{SHA}")
    # One fresh process for both references (importing torch twice would double the cost).
    script = "import sys\nfrom hpseg.cli.main import main\n" + "".join(
        f"assert main(['predict', {str(photos)!r}, '--checkpoint', {reference!r}, '--out', "
        f"{str(tmp_path / 'preds' / reference[-6:])!r}, '--no-progress']) == 0\n" for reference in references)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for reference in references:
        out = tmp_path / "preds" / reference[-6:]
        summary = json.loads((out / "predictions.json").read_text())
        assert summary["mapping"] == f"{reference}/config.json" and summary["values"].startswith("class ids")
        expected = hpseg.load(run_with_eval / "checkpoints" / "last.pt", device="cpu", mapping="auto").segment(Image.open(photos / "a.png"))
        labels = np.array(Image.open(out / "labels" / "a.png")).astype(np.int64)
        assert np.array_equal(labels, expected)


def test_hf_reference_missing_offline_names_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"hf://nobody/nothing@v2: the repository is not in the Hugging Face cache"):
        hpseg.load("hf://nobody/nothing@v2")
    with pytest.raises(ValueError, match="not a Hub repository id"):
        hpseg.load("hf://just-a-name")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="neither a run folder .no config.yaml. nor a hub folder .no config.json."):
        hpseg.load(tmp_path / "folder")


def test_push_builds_one_commit_of_the_folder(folder: Path) -> None:
    operations = push_operations(folder)
    assert [op.path_in_repo for op in operations] == ["README.md", "backbone.safetensors", "config.json",
                                                      "model.safetensors"]
    assert all(Path(op.path_or_fileobj).read_bytes() == (folder / op.path_in_repo).read_bytes() for op in operations)

    class RecordingApi:  # stands in for HfApi: no network
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def create_repo(self, repo_id: str, **kwargs) -> None:
            self.calls.append(("create_repo", repo_id, kwargs))

        def create_commit(self, repo_id: str, operations: list, **kwargs) -> str:
            self.calls.append(("create_commit", repo_id, [op.path_in_repo for op in operations], kwargs))
            return "commit"

    api = RecordingApi()
    assert push(folder, "me/hp-tiny", private=True, api=api) == "commit"
    assert api.calls[0] == ("create_repo", "me/hp-tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert api.calls[1][2] == [op.path_in_repo for op in operations]
    with pytest.raises(ValueError, match="not a folder written by"):
        push_operations(folder.parent / "nowhere")


def test_official_weights_are_named_not_copied() -> None:
    from hpseg.backbones import get_spec
    from hpseg.export.hub import _backbone_entry

    spec = get_spec("dino_vits8")
    official = _backbone_entry(spec, "official")
    assert official["weights"] == "official" and official["source"] == spec.weights_source and "dino" in official["source"]
    assert official["licence"].startswith("Apache-2.0")
    local = _backbone_entry(spec, "/w/mine.pth")
    assert local["weights"] == "backbone.safetensors" and local["hf_hub_id"] is None and "mine.pth" in local["licence"]
