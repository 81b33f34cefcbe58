"""Every source a user can name (checkpoint file, run folder, hub folder, hf:// name, authors'
checkpoint) through every entry point (hpseg.load, predict, app, export, eval, clusters): the
same label maps (and, for eval and clusters, the same numbers) whatever the source.

The run over-clusters (method.extra_clusters=2: 6 clusters for 4 classes), which a hub folder
once lost ("size mismatch for cluster_probe.centroids"), and a run folder was refused by
predict, hpseg.load, app and export."""

from __future__ import annotations

import json
import shutil
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hpseg
from hpseg.checkpoints.sources import SourceKind, resolve_source
from hpseg.checkpoints.trained import load_trained
from hpseg.cli import app
from hpseg.cli.main import main
from hpseg.export.hub import export_hub
from hpseg.training.trainer import train
from tests.helpers import authors_payload, synthetic_prepared, tiny_config

pytest.importorskip("huggingface_hub")

SHA = "89abcdef0123456789abcdef0123456789abcdef"
REPO = "someone/hp-over"


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (37, 45, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny over-clustering run, its hub export, that export in a Hub cache, an authors' file
    and its import, and a folder of photos."""
    base = tmp_path_factory.mktemp("sources")
    data = synthetic_prepared(base)
    run = base / "run"
    train(tiny_config(data, base / "runs", steps=4, extra=["method.extra_clusters=2", "train.selection=last"]),
          run_dir=run)
    hub = base / "hub"
    export_hub(run / "checkpoints" / "last.pt", hub, mapping=None)
    cache = base / "cache"
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA
    shutil.copytree(hub, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(SHA)
    authors = base / "authors.pth"
    torch.save(authors_payload(seed=5), authors)
    assert main(["import-checkpoint", str(authors), "--out", str(base / "imported.pt"), "--dataset", "folder"]) == 0
    photos = base / "photos"
    photos.mkdir()
    Image.fromarray(_image()).save(photos / "a.png")
    return {"run": run, "hub": hub, "cache": cache, "authors": authors, "imported": base / "imported.pt",
            "photos": photos, "data": data, "base": base}


@pytest.fixture(autouse=True)
def hub_cache(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


#: (source id, what it names, its kind, the group whose sources must give the same labels)
SOURCES = [
    ("file", lambda w: w["run"] / "checkpoints" / "last.pt", SourceKind.FILE, "run"),
    ("run folder", lambda w: w["run"], SourceKind.RUN, "run"),
    ("hub folder", lambda w: w["hub"], SourceKind.HUB, "run"),
    ("hf name", lambda w: f"hf://{REPO}", SourceKind.HF, "run"),
    ("hf name at a commit", lambda w: f"hf://{REPO}@{SHA}", SourceKind.HF, "run"),
    ("authors' checkpoint", lambda w: w["authors"], SourceKind.FILE, "authors"),
]
#: The reference source of each group: a plain hpseg checkpoint file.
GROUP_REFERENCE = {"run": lambda w: w["run"] / "checkpoints" / "last.pt", "authors": lambda w: w["imported"]}


def _via_load(source: str, w: dict[str, Path], out: Path) -> np.ndarray:
    return hpseg.load(source, device="cpu").segment(_image())


def _via_predict(source: str, w: dict[str, Path], out: Path) -> np.ndarray:
    assert main(["--quiet", "predict", str(w["photos"]), "--checkpoint", source, "--out", str(out),
                 "--no-progress"]) == 0
    return np.array(Image.open(out / "labels" / "a.png")).astype(np.int64)


def _via_app(source: str, w: dict[str, Path], out: Path, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    served = []
    monkeypatch.setattr(app, "_import_gradio", lambda: None)
    monkeypatch.setattr(app, "serve", lambda segmenter, *args, **kwargs: served.append(segmenter))
    args = Namespace(checkpoint=source, device="cpu", weights=None, no_mapping=False, mapping=None, size=None,
                     window=None, host="127.0.0.1", port=0)
    assert app.run_cli(args) == 0
    return served[0].segment(_image())


def _via_export(source: str, w: dict[str, Path], out: Path) -> np.ndarray:
    assert main(["--quiet", "export", source, "--format", "hub", "--out", str(out)]) == 0
    return hpseg.load(out, device="cpu").segment(_image())


ENTRY_POINTS: dict[str, Callable[..., np.ndarray]] = {
    "hpseg.load": _via_load, "predict": _via_predict, "app": _via_app, "export": _via_export}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(("name", "source", "kind", "group"), SOURCES, ids=[s[0] for s in SOURCES])
def test_every_source_through_every_entry_point(world, name, source, kind, group, entry, tmp_path, monkeypatch):
    text = str(source(world))
    assert resolve_source(text).kind is kind
    expected = hpseg.load(GROUP_REFERENCE[group](world), device="cpu").segment(_image())
    extra = (monkeypatch,) if entry == "app" else ()
    labels = ENTRY_POINTS[entry](text, world, tmp_path / "out", *extra)
    assert labels.shape == expected.shape and np.array_equal(labels, expected)
    if group == "run":
        assert labels.max() < 6 and len(np.unique(labels)) > 1  # the over-clustered cluster head


@pytest.mark.parametrize(("name", "source", "kind", "group"), [s for s in SOURCES if s[3] == "run"],
                         ids=[s[0] for s in SOURCES if s[3] == "run"])
def test_eval_and_clusters_agree_across_sources(world, name, source, kind, group, tmp_path):
    text = str(source(world))
    reference = world["base"] / "reference-eval"
    if not (reference / "results.json").exists():
        assert main(["--quiet", "eval", str(world["run"] / "checkpoints" / "last.pt"), "--out", str(reference),
                     "--no-progress"]) == 0
        assert main(["--quiet", "clusters", str(world["run"] / "checkpoints" / "last.pt"), "--data-root",
                     str(world["data"]), "--split", "val", "--k", "2..3", "--max-patches", "200",
                     "--out", str(world["base"] / "reference-clusters")]) == 0
    assert main(["--quiet", "eval", text, "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    expected = json.loads((reference / "results.json").read_text())
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["hp"] == expected["hp"] and len(results["cluster_to_class"]) == 6
    assert main(["--quiet", "clusters", text, "--data-root", str(world["data"]), "--split", "val", "--k", "2..3",
                 "--max-patches", "200", "--out", str(tmp_path / "clusters")]) == 0
    rows = json.loads((tmp_path / "clusters" / "clusters.json").read_text())["rows"]
    assert rows == json.loads((world["base"] / "reference-clusters" / "clusters.json").read_text())["rows"]


def test_hub_model_keeps_the_runs_cluster_count_and_precision(world, tmp_path):
    """The two bugs of issue 20: a hub folder of an over-clustering run loads with its 6
    clusters, and runs in the precision the run's train.amp gives on the device (a run trained
    in bfloat16 runs in bfloat16 on the CPU too; the hub loader passed no precision at all)."""
    from_file = load_trained(world["run"] / "checkpoints" / "last.pt", device="cpu")
    for source in (world["hub"], f"hf://{REPO}"):
        assert load_trained(source, device="cpu").n_clusters == from_file.n_clusters == 6
    bf16 = tmp_path / "bf16"
    shutil.copytree(world["hub"], bf16)
    config = json.loads((bf16 / "config.json").read_text())
    config["config"]["train"]["amp"] = "bf16"
    (bf16 / "config.json").write_text(json.dumps(config))
    assert hpseg.load(bf16, device="cpu").amp_dtype == torch.bfloat16


def test_eval_of_an_hf_name_writes_beside_the_user_not_into_the_hub_cache(world):
    checkpoint = load_trained(f"hf://{REPO}@{SHA}", device="cpu").checkpoint
    assert checkpoint.evaluation_dir(crf=True) == Path(f"eval-someone--hp-over-{SHA}-crf")
    assert load_trained(world["hub"], device="cpu").checkpoint.evaluation_dir() == world["base"] / "eval-hub"


def test_export_lists_every_file_it_wrote(world, tmp_path, capsys):
    assert main(["export", str(world["run"]), "--format", "hub", "--out", str(tmp_path / "hub")]) == 0
    said = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "backbone.safetensors", "README.md"):
        assert name in said and (tmp_path / "hub" / name).is_file(), name
