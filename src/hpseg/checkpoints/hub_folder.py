"""The Hugging Face Hub folder format (``hpseg export --format hub`` writes it) and its one
validating reader.

A folder::

    config.json          format marker and version, backbone (name, weights source, licence),
                         model sizes, tiling, class names and colours, cluster->class mapping,
                         evaluation results, the checkpoint it came from, the run's config
    model.safetensors    the heads (state dict of HiddenPositivesModel)
    backbone.safetensors the backbone's weights, when they are not the official ones
    README.md            the model card

:func:`read_hub_folder` checks every ``config.json`` entry it uses for type and range before
anything is allocated, checks that both safetensors files are safetensors (a ``torch.save``
file is refused, never unpickled) whose tensors fit those sizes, and names the file in every
message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpseg.checkpoints.mapping import MappingError, check_mapping
from hpseg.checkpoints.payload import CHECKPOINT_KINDS, BackboneRecord, CheckpointPayload
from hpseg.checkpoints.store import CheckpointError
from hpseg.config import Config
from hpseg.method.model import HiddenPositivesModel

__all__ = ["BACKBONE", "CARD", "CONFIG", "FORMAT", "HEADS", "OFFICIAL", "VERSION", "HubFolder", "HubFolderError",
           "is_hub_folder", "read_hub_folder"]

FORMAT = "hpseg-hub"
VERSION = 1
CONFIG, HEADS, BACKBONE, CARD = "config.json", "model.safetensors", "backbone.safetensors", "README.md"
#: ``backbone.weights`` of a folder whose backbone is the official file of its name.
OFFICIAL = "official"

#: Plausible sizes: far above any real model (a ViT-g is 1536 wide; datasets have hundreds of
#: classes), far below what would exhaust memory before the weights are even compared.
MAX_WIDTH, MAX_CLASSES, MAX_SIDE = 16384, 16384, 65536


class HubFolderError(CheckpointError):
    """A hub folder that cannot be used; the message names the file and the entry at fault."""


def is_hub_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a ``config.json`` (valid or not: the reader says what is wrong)."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


#: How messages call JSON values, by the Python type json.loads gives them.
_JSON_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list",
               bool: "true or false"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(section: dict[str, Any], key: str, kind: type, file: Path, where: str) -> Any:
    """``section[key]`` of type ``kind`` (int excludes bool; float accepts int), else HubFolderError."""
    if key not in section:
        raise HubFolderError(f"{file}: no {where}{key!r} entry")
    value = section[key]
    if kind is int:
        ok = _is_int(value)
    elif kind is float:
        ok = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise HubFolderError(f"{file}: {where}{key} is {value!r} ({_JSON_NAMES.get(type(value), 'null')}), "
                             f"expected {_JSON_NAMES[kind]}")
    return value


def _bounded(section: dict[str, Any], key: str, low: int, high: int, file: Path, where: str) -> int:
    value = _entry(section, key, int, file, where)
    if not low <= value <= high:
        raise HubFolderError(f"{file}: {where}{key}={value} is out of range: allowed {low} <= {where}{key} <= {high}")
    return value


@dataclass
class HubFolder:
    """A checked hub folder: the checkpoint it holds, its stored mapping and default image size."""

    payload: CheckpointPayload
    cluster_to_class: list[int] | None
    size: int


def _read_json(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise HubFolderError(f"{file}: not readable ({type(error).__name__}: {error})") from None
    try:
        value = json.loads(text)
    except ValueError as error:
        raise HubFolderError(f"{file}: not valid JSON ({error}); the file is damaged or cut short: "
                             "export the folder again") from None
    if not isinstance(value, dict):
        raise HubFolderError(f"{file}: expected a JSON object, found a {type(value).__name__}")
    return value


def _check_header(entries: dict[str, Any], file: Path) -> None:
    if entries.get("format") != FORMAT:
        raise HubFolderError(f"{file}: not an hpseg hub config (format is {entries.get('format')!r}, expected "
                             f"{FORMAT!r}): expected a folder written by `hpseg export --format hub`")
    version = _entry(entries, "version", int, file, "")
    if version > VERSION:
        raise HubFolderError(f"{file} was written by a newer hpseg (format version {version}; this one reads "
                             f"{VERSION})")
    if version < 1:
        raise HubFolderError(f"{file}: version={version} is out of range: allowed 1 <= version <= {VERSION}")


def _backbone_record(entries: dict[str, Any], folder: Path, file: Path) -> BackboneRecord:
    backbone = _entry(entries, "backbone", dict, file, "")
    name = _entry(backbone, "name", str, file, "backbone.")
    weights = _entry(backbone, "weights", str, file, "backbone.")
    if weights not in (OFFICIAL, BACKBONE):
        raise HubFolderError(f"{file}: backbone.weights is {weights!r}, expected {OFFICIAL!r} or {BACKBONE!r}")
    if weights == OFFICIAL:
        source = backbone.get("source")
        return BackboneRecord(name, weights=None, pretrained=True,
                              official_weights=source if isinstance(source, str) else None)
    weights_file = folder / BACKBONE
    if not weights_file.is_file():
        raise HubFolderError(f"{file}: backbone.weights says {BACKBONE}, but {weights_file} does not exist")
    _safetensors_shapes(weights_file)
    return BackboneRecord(name, weights=str(weights_file), pretrained=False, official_weights=None)


def _sizes(entries: dict[str, Any], file: Path) -> dict[str, int]:
    model = _entry(entries, "model", dict, file, "")
    sizes = {key: _bounded(model, key, 1, MAX_WIDTH, file, "model.") for key in ("feature_dim", "dim")}
    sizes["n_classes"] = _bounded(model, "n_classes", 1, MAX_CLASSES, file, "model.")
    sizes["n_clusters"] = _bounded(model, "n_clusters", sizes["n_classes"], MAX_CLASSES, file, "model.")
    dropout = _entry(model, "dropout", float, file, "model.") if "dropout" in model else 0.1
    if not 0 <= dropout < 1:
        raise HubFolderError(f"{file}: model.dropout={dropout} is out of range: allowed 0 <= model.dropout < 1")
    return sizes


def _config(entries: dict[str, Any], sizes: dict[str, int], file: Path) -> Config:
    """The run's config stored in the folder, checked against the ``model`` sizes."""
    try:
        config = Config.from_dict(_entry(entries, "config", dict, file, ""))
    except (ValueError, TypeError) as error:
        raise HubFolderError(f"{file}: the run's config inside it ('config') is invalid: {error}") from None
    recorded = {"dim": config.method.dim, "n_classes": config.method.n_classes, "n_clusters": config.n_clusters}
    for key, value in recorded.items():
        if sizes[key] != value:
            raise HubFolderError(f"{file}: model.{key}={sizes[key]} but the run's config inside it says {value}")
    return config


def _class_names(entries: dict[str, Any], n_classes: int, file: Path) -> list[str]:
    names = _entry(entries, "class_names", list, file, "")
    if len(names) != n_classes or not all(isinstance(n, str) for n in names):
        raise HubFolderError(f"{file}: class_names must be a list of {n_classes} strings (model.n_classes)")
    return names


def _tiling_size(entries: dict[str, Any], file: Path) -> int:
    tiling = _entry(entries, "tiling", dict, file, "")
    return _bounded(tiling, "size", 0, MAX_SIDE, file, "tiling.")


def _mapping(entries: dict[str, Any], sizes: dict[str, int], file: Path) -> list[int] | None:
    value = entries.get("cluster_to_class")
    if value is None:
        return None
    try:
        return check_mapping(value, sizes["n_clusters"], sizes["n_classes"], f"{file}: cluster_to_class")
    except MappingError as error:
        raise HubFolderError(str(error)) from None


def _checkpoint_entry(entries: dict[str, Any], file: Path) -> tuple[str, int | None, str]:
    """(kind, step, selection) of the checkpoint the folder was exported from."""
    checkpoint = entries.get("checkpoint") if isinstance(entries.get("checkpoint"), dict) else {}
    kind, step = checkpoint.get("kind") or "last", checkpoint.get("step")
    if kind not in CHECKPOINT_KINDS:
        raise HubFolderError(f"{file}: checkpoint.kind is {kind!r}, expected one of {', '.join(CHECKPOINT_KINDS)}")
    if step is not None and (not _is_int(step) or step < 0):
        raise HubFolderError(f"{file}: checkpoint.step is {step!r}, expected a step number")
    return kind, step, str(checkpoint.get("selection") or "unknown")


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a safetensors file, from its header alone; HubFolderError for a file
    that is not one (a ``torch.save`` pickle is refused, never unpickled) or is cut short."""
    from safetensors import safe_open

    with file.open("rb") as stream:
        head = stream.read(9)
    if head.startswith((b"PK\x03\x04", b"\x80")):
        raise HubFolderError(f"{file} is not a safetensors file: it is a torch.save (pickle) file, which hub "
                             "folders never hold and hpseg never unpickles; export the folder again")
    if len(head) < 9 or head[8:9] != b"{":
        raise HubFolderError(f"{file} is not a safetensors file (it starts with {head!r})")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: all mean "unusable"
        raise HubFolderError(f"{file} is not a readable safetensors file (truncated or damaged: {error}); "
                             "export the folder again") from None


def _read_safetensors(file: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of ``file`` after checking, from its header, that it holds exactly the keys and
    shapes ``expected`` (so nothing larger than the model is allocated)."""
    from safetensors.torch import load_file

    shapes = _safetensors_shapes(file)
    wrong = [f"{k}: {shapes.get(k, 'missing')} in the file, {v} expected" for k, v in expected.items()
             if shapes.get(k) != v] + [f"{k}: unexpected" for k in shapes if k not in expected]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise HubFolderError(f"{file}: the tensors do not fit the sizes in {CONFIG}: {'; '.join(wrong[:3])}{more}")
    return load_file(str(file), device="cpu")


def _head_shapes(sizes: dict[str, int], config: Config) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the heads of these sizes (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        model = HiddenPositivesModel(sizes["feature_dim"], sizes["dim"], sizes["n_classes"], config.method.dropout,
                                     n_clusters=sizes["n_clusters"])
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def read_hub_folder(folder: str | Path) -> HubFolder:
    """Read and check the hub folder ``folder`` (see the module docstring); HubFolderError naming
    the file and the entry at fault."""
    folder = Path(folder)
    file = folder / CONFIG
    entries = _read_json(file)
    _check_header(entries, file)
    sizes = _sizes(entries, file)
    config = _config(entries, sizes, file)
    class_names = _class_names(entries, sizes["n_classes"], file)
    size = _tiling_size(entries, file)
    mapping = _mapping(entries, sizes, file)
    backbone = _backbone_record(entries, folder, file)
    kind, step, selection = _checkpoint_entry(entries, file)
    heads = folder / HEADS
    if not heads.is_file():
        raise HubFolderError(f"{heads} does not exist: a hub folder holds the heads in {HEADS}")
    payload = CheckpointPayload(kind=kind, step=step, config=config, backbone=backbone,
                                model=_read_safetensors(heads, _head_shapes(sizes, config)),
                                class_names=class_names, selection=selection)
    return HubFolder(payload, mapping, size)
