"""Hub folders and hf:// names a careful user might hand over (issue 21): each refused with a
message naming the file (or the name) and what is wrong, before anything is allocated,
unpickled, or looked up outside the Hub cache."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

import hpseg
from hpseg.checkpoints.hf_names import HubName, parse_hub_name
from hpseg.checkpoints.store import CheckpointError
from hpseg.cli.main import main
from hpseg.export.hub import export_hub

pytest.importorskip("huggingface_hub")


@pytest.fixture(scope="module")
def good(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hub-good") / "hub"
    export_hub(tiny_run / "checkpoints" / "last.pt", folder, mapping=None)
    return folder


def _edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return apply


def _cut_in_half(name: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return apply


def _pickle_heads(folder: Path) -> None:
    """model.safetensors replaced by a torch.save pickle of the right tensors."""
    from safetensors.torch import load

    # From the bytes: a file still mapped by load_file must not be overwritten (bus error).
    torch.save(load((folder / "model.safetensors").read_bytes()), folder / "model.safetensors")


def _photos(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 32), (120, 30, 200)).save(photos / "a.png")
    return photos


#: (case, how the good folder is damaged, the file named, what the message says)
CASES = [
    ("no backbone", _edit_config(lambda c: c.pop("backbone")), "config.json", "no 'backbone' entry"),
    ("no model", _edit_config(lambda c: c.pop("model")), "config.json", "no 'model' entry"),
    ("model.dim a string", _edit_config(lambda c: c["model"].update(dim="abc")), "config.json",
     "model.dim is 'abc' (a string), expected an integer"),
    ("version a string", _edit_config(lambda c: c.update(version="1")), "config.json", "version is '1' (a string), expected an integer"),
    ("model a list", _edit_config(lambda c: c.update(model=[16, 4])), "config.json",
     "model is [16, 4] (a list), expected an object"),
    ("a newer format", _edit_config(lambda c: c.update(version=2)), "config.json", "written by a newer hpseg"),
    ("backbone weights elsewhere", _edit_config(lambda c: c["backbone"].update(weights="/etc/passwd")), "config.json",
     "backbone.weights is '/etc/passwd', expected 'official' or 'backbone.safetensors'"),
    ("config.json cut in half", _cut_in_half("config.json"), "config.json", "not valid JSON"),
    ("n_classes 10**9", _edit_config(lambda c: c["model"].update(n_classes=10**9)), "config.json",
     "model.n_classes=1000000000 is out of range"),
    ("sizes that contradict the run's config", _edit_config(lambda c: c["model"].update(dim=8)), "config.json",
     "model.dim=8 but the run's config inside it says 16"),
    ("mapping of the wrong length", _edit_config(lambda c: c.update(cluster_to_class=[0, 1])), "config.json",
     "cluster_to_class must be a list of 4 integers"),
    ("heads a torch.save pickle", _pickle_heads, "model.safetensors", "not a safetensors file: it is a torch.save"),
    ("heads cut short", _cut_in_half("model.safetensors"), "model.safetensors", "truncated or damaged"),
    ("backbone cut short", _cut_in_half("backbone.safetensors"), "backbone.safetensors", "truncated or damaged"),
    ("no heads", lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "does not exist"),
]


@pytest.mark.parametrize(("case", "damage", "file", "says"), CASES, ids=[c[0] for c in CASES])
def test_damaged_hub_folder_is_refused_naming_the_file(good, tmp_path, monkeypatch, case, damage, file, says):
    folder = tmp_path / "hub"
    shutil.copytree(good, folder)
    damage(folder)

    def never(*args, **kwargs):
        raise AssertionError("a hub folder must never be unpickled")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(CheckpointError) as error:
        hpseg.load(folder, device="cpu")
    assert str(folder / file) in str(error.value) and says in str(error.value)


def test_damaged_hub_folder_gives_one_line_in_the_cli(good, tmp_path, capsys):
    folder = tmp_path / "hub"
    shutil.copytree(good, folder)
    _cut_in_half("config.json")(folder)
    assert main(["predict", str(_photos(tmp_path)), "--checkpoint", str(folder), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{folder / 'config.json'}: not valid JSON" in err


@pytest.mark.parametrize("name", [
    "hf://owner/name@../../../outside/FILE", "hf://owner/..", "hf://../name", "hf://owner/name@..",
    "hf://owner/name@refs/../../x", "hf://owner/name@.hidden", "hf://owner/na--me", "hf://owner/name.git",
    "hf://owner/name@", "hf://owner/name@a b", "hf://owner/name@x.lock", "hf://owner/name@main/",
    "hf://owner/-name", "hf://owner", "hf://a/b/c", "hf://owner/name@x@{1}", "hf://owner/n\\ame",
])
def test_bad_hf_names_are_refused_before_any_lookup(name, monkeypatch, tmp_path):
    import huggingface_hub

    def never(*args, **kwargs):
        raise AssertionError(f"{name}: looked up although the name is invalid")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    with pytest.raises(CheckpointError, match="not a Hub repository id|not a revision"):
        hpseg.load(name, device="cpu")


def test_bad_hf_name_in_the_cli_is_one_line(tmp_path, capsys):
    code = main(["predict", str(_photos(tmp_path)), "--checkpoint", "hf://owner/name@../../../outside/FILE",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "'../../../outside/FILE' is not a revision" in err


@pytest.mark.parametrize(("name", "parsed"), [
    ("hf://owner/name", HubName("owner/name")),
    ("hf://Owner-1/hp.tiny_v2@main", HubName("Owner-1/hp.tiny_v2", "main")),
    ("hf://o/n@refs/pr/3", HubName("o/n", "refs/pr/3")),
    ("hf://o/n@v1.0", HubName("o/n", "v1.0")),
    ("hf://o/n@0123456789abcdef0123456789abcdef01234567", HubName("o/n", "0123456789abcdef0123456789abcdef01234567")),
])
def test_good_hf_names_parse(name, parsed):
    assert parse_hub_name(name) == parsed and str(parsed) == name


@pytest.mark.parametrize("repo_id", ["owner/name", "a/b", "Owner-1/hp.tiny_v2", "o/n--m", "o/n..m", "o/.n",
                                     "o/n.", "o/-n", "o/n-", "o/n.git", "o/" + "n" * 96, "o/" + "n" * 97, "o/n m",
                                     "o/n_", "_o/n", "o/n/x"])
def test_repository_ids_follow_the_hubs_own_rules(repo_id):
    """hf_names agrees with huggingface_hub's validate_repo_id (for owner/name ids)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        hub_accepts = "/" in repo_id
    except HFValidationError:
        hub_accepts = False
    try:
        parse_hub_name(f"hf://{repo_id}")
        ours = True
    except CheckpointError:
        ours = False
    assert ours == hub_accepts
