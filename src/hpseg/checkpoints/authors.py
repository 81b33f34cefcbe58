"""Checkpoints of the authors' implementation (github hynnsk/HP): read, converted, imported.

    hpseg import-checkpoint HP_cocostuff_vits8.pth --out hp-cocostuff-vits8.pt [--dataset cocostuff27]

The authors' code saves one dict (read here with ``torch.load(weights_only=True)`` only):

* ``net_model_state_dict``: the backbone under ``model.*`` (DINO key names, which are timm's);
  the segmentation head's linear branch ``cluster1.0.{weight,bias}`` (D x C x 1 x 1) and its
  nonlinear branch ``cluster2.0.*`` (C x C x 1 x 1), ``cluster2.2.*`` (D x C x 1 x 1); the EMA
  copies ``ema_model1.*`` / ``ema_model2.*`` with the same layout;
* ``linear_model_state_dict``: the linear probe ``weight`` (n_classes x D x 1 x 1), ``bias``;
* ``cluster_model_state_dict``: the cluster probe ``clusters`` (K x D).

The conversion writes an hpseg checkpoint (``format``, ``config``, ``backbone``, ``model``,
``class_names``, ...; see :class:`hpseg.checkpoints.payload.CheckpointPayload`) and the backbone's weights as a safetensors
file beside it (``<out stem>.backbone.safetensors``), referenced by ``backbone.weights`` (an
absolute path; when the pair of files moves together, ``hpseg predict`` and :func:`hpseg.load`
find the weights beside the checkpoint, and ``hpseg eval --weights FILE`` points at them
explicitly). The backbone (``dino_vits8``, ``dino_vits16``, ``dino_vitb8``, ``dino_vitb16``) is
inferred from the shape of ``model.patch_embed.proj.weight`` (width x 3 x patch x patch) and the
number of blocks. The projection head P is not part of the file (it only matters for training):
the converted checkpoint is for evaluation and prediction, not for resuming training.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file

from hpseg.backbones import Backbone, BackboneWeightsError, create_backbone, list_backbones
from hpseg.backbones.weights import strip_key_prefixes
from hpseg.checkpoints.payload import BackboneRecord, CheckpointPayload
from hpseg.checkpoints.store import CheckpointError, is_hpseg_checkpoint, read_torch_file, save_atomic
from hpseg.config import load_preset
from hpseg.data import dataset_class_names
from hpseg.files import atomic_write
from hpseg.method.model import HiddenPositivesModel

__all__ = [
    "ConvertedAuthors",
    "convert_authors",
    "import_authors_checkpoint",
    "infer_backbone",
    "is_authors_checkpoint",
]

NET, LINEAR, CLUSTER = "net_model_state_dict", "linear_model_state_dict", "cluster_model_state_dict"

#: hpseg's HiddenPositivesModel keys <- the authors', for the two copies of the head.
_HEAD_KEYS = {
    "linear.weight": "{}1.0.weight", "linear.bias": "{}1.0.bias",
    "nonlinear.0.weight": "{}2.0.weight", "nonlinear.0.bias": "{}2.0.bias",
    "nonlinear.2.weight": "{}2.2.weight", "nonlinear.2.bias": "{}2.2.bias",
}
_PREFIXES = ("module.", "_orig_mod.")
#: The seed of the projection head P, which the authors' file lacks (a fixed filler).
_PROJECTION_SEED = 0


def is_authors_checkpoint(payload: Any) -> bool:
    """Whether a loaded file looks like an authors' checkpoint (not an hpseg one)."""
    return isinstance(payload, dict) and not is_hpseg_checkpoint(payload) and NET in payload


def _section(payload: dict[str, Any], name: str, path: Path) -> dict[str, torch.Tensor]:
    section = payload.get(name)
    if not isinstance(section, dict):
        present = ", ".join(map(str, list(payload)[:8]))
        raise CheckpointError(f"{path}: not an authors' HP checkpoint: no {name!r} (top-level keys: {present})")
    return {strip_key_prefixes(str(k), _PREFIXES): v for k, v in section.items() if isinstance(v, torch.Tensor)}


def _tensor(section: dict[str, torch.Tensor], key: str, where: str, path: Path, ndim: int) -> torch.Tensor:
    if key not in section:
        similar = [k for k in section if not k.startswith("model.")][:8]
        raise CheckpointError(f"{path}: missing key {where}[{key!r}] (non-backbone keys present: {similar})")
    value = section[key]
    if value.ndim != ndim:
        raise CheckpointError(f"{path}: {where}[{key!r}] has shape {tuple(value.shape)}, expected {ndim} dimensions")
    return value


def infer_backbone(backbone_state: dict[str, torch.Tensor], path: Path) -> str:
    """Registered backbone name matching the authors' ViT tensors (width, patch, depth)."""
    weight = backbone_state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4 or weight.shape[1] != 3:
        raise CheckpointError(f"{path}: cannot tell the backbone: missing or malformed 'model.patch_embed.proj.weight'")
    width, patch = int(weight.shape[0]), int(weight.shape[-1])
    depth = len({m.group(1) for k in backbone_state if (m := re.match(r"blocks\.(\d+)\.", k))})
    for spec in list_backbones():
        if spec.family in ("dino", "random") and (spec.embed_dim, spec.patch_size, spec.depth) == (width, patch, depth):
            return spec.name
    raise CheckpointError(
        f"{path}: no registered DINO backbone has width {width}, patch {patch} and {depth} blocks "
        "(the authors use DINO ViT-S/8, S/16, B/8 or B/16); pass --backbone NAME to force one"
    )


def _class_names(dataset: str | None, n_classes: int, path: Path) -> tuple[str, list[str]]:
    if dataset is None:
        dataset = {27: "cocostuff27", 3: "potsdam3"}.get(n_classes, "folder")
    names = dataset_class_names(dataset) or [f"class {k}" for k in range(n_classes)]
    if len(names) != n_classes:
        raise CheckpointError(f"{path}: the linear probe has {n_classes} classes but {dataset} has {len(names)}")
    return dataset, names


@dataclass
class ConvertedAuthors:
    """An hpseg checkpoint payload and the backbone tensors (timm key names) of an authors' file."""

    checkpoint: CheckpointPayload
    backbone_state: dict[str, torch.Tensor]
    backbone_name: str

    def backbone(self) -> Backbone:
        """The backbone with the file's own weights, loaded strictly."""
        with tempfile.TemporaryDirectory() as folder:
            file = Path(folder) / "backbone.safetensors"
            save_file({k: v.contiguous() for k, v in self.backbone_state.items()}, str(file))
            return create_backbone(self.backbone_name, weights=file)


def convert_authors(payload: Any, path: str | Path, *, dataset: str | None = None,
                    backbone: str | None = None) -> ConvertedAuthors:
    """Convert a loaded authors' checkpoint dict; errors name ``path`` and the key at fault."""
    path = Path(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not an authors' HP checkpoint (a {type(payload).__name__}, not a dict)")
    net = _section(payload, NET, path)
    linear = _section(payload, LINEAR, path)
    cluster = _section(payload, CLUSTER, path)
    backbone_state = {k[len("model."):]: v for k, v in net.items() if k.startswith("model.")}
    backbone_state = {k: v for k, v in backbone_state.items() if not k.startswith("head.")}
    if not backbone_state:
        raise CheckpointError(f"{path}: {NET} holds no backbone tensors (keys 'model.*')")
    name = backbone or infer_backbone(backbone_state, path)

    first = _tensor(net, "cluster1.0.weight", NET, path, 4)
    dim, width = int(first.shape[0]), int(first.shape[1])
    embed = backbone_state.get("patch_embed.proj.weight")
    if embed is not None and int(embed.shape[0]) != width:
        raise CheckpointError(f"{path}: {NET}['cluster1.0.weight'] has input width {width} but the backbone's is "
                              f"{int(embed.shape[0])}")
    linear_weight = _tensor(linear, "weight", LINEAR, path, 4)
    linear_bias = _tensor(linear, "bias", LINEAR, path, 1)
    clusters = _tensor(cluster, "clusters", CLUSTER, path, 2)
    n_classes = int(linear_weight.shape[0])
    if int(clusters.shape[0]) != n_classes:
        raise CheckpointError(f"{path}: {CLUSTER}['clusters'] has {int(clusters.shape[0])} clusters but the linear "
                              f"probe {n_classes} classes; hpseg's cluster probe has one cluster per class")

    # The projection head is not in the file: a deterministic filler, drawn without touching the
    # caller's random number generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_PROJECTION_SEED)
        model = HiddenPositivesModel(width, dim, n_classes)
    state = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for ours, theirs in _HEAD_KEYS.items():
        mapped[f"segmentation.{ours}"] = _tensor(net, theirs.format("cluster"), NET, path, 4 if "weight" in ours else 1)
        ema_key = theirs.format("ema_model")
        # A file without EMA copies (S' only matters in training): S' = S.
        mapped[f"ema_segmentation.{ours}"] = net.get(ema_key, mapped[f"segmentation.{ours}"])
    mapped["linear_probe.classifier.weight"] = linear_weight
    mapped["linear_probe.classifier.bias"] = linear_bias
    mapped["cluster_probe.centroids"] = clusters
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise CheckpointError(f"{path}: tensor for {key} has shape {tuple(value.shape)}, expected "
                                  f"{tuple(state[key].shape)} (backbone width {width}, D {dim}, {n_classes} classes)")
        state[key] = value.float()
    model.load_state_dict(state)

    dataset_name, class_names = _class_names(dataset, n_classes, path)
    config = load_preset(dataset_name) if dataset_name != "folder" else load_preset("cocostuff27")
    if dataset_name == "folder":
        config.data.dataset = "folder"
    config.backbone.name, config.backbone.pretrained, config.backbone.weights = name, True, None
    config.method.dim, config.method.n_classes = dim, n_classes
    checkpoint = CheckpointPayload(
        kind="imported", step=None, config=config, backbone=BackboneRecord(name, weights=None, pretrained=True),
        model=model.state_dict(), class_names=class_names,
        selection=f"imported from the authors' checkpoint {path.name} (their rule: best sum of validation metrics)",
        imported_from=str(path))
    return ConvertedAuthors(checkpoint, backbone_state, name)


def import_authors_checkpoint(
    authors: str | Path,
    out: str | Path,
    *,
    dataset: str | None = None,
    backbone: str | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Convert the authors' checkpoint file ``authors`` to an hpseg checkpoint ``out``.

    Writes ``out`` and ``<out stem>.backbone.safetensors`` beside it (both atomically) after
    checking that the backbone tensors load strictly into the inferred backbone. Returns a
    summary (paths, backbone, sizes, dataset).
    """
    authors, out = Path(authors), Path(out)
    payload = read_torch_file(authors)
    converted = convert_authors(payload, authors, dataset=dataset, backbone=backbone)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = out.with_name(f"{out.stem}.backbone.safetensors")
    try:
        converted.backbone()  # strict: every key and shape, checked before anything is written
    except BackboneWeightsError as error:
        raise CheckpointError(f"{authors}: the backbone tensors under 'model.' do not load into "
                              f"{converted.backbone_name}: {error}") from None
    with atomic_write(weights) as handle:
        handle.write(save({k: v.contiguous() for k, v in converted.backbone_state.items()}))
    checkpoint = converted.checkpoint
    resolved = str(weights.resolve())
    checkpoint.backbone.weights = checkpoint.config.backbone.weights = resolved
    if data_root:
        checkpoint.config.data.root = str(data_root)
    save_atomic(checkpoint.to_dict(), out)
    method = checkpoint.config.method
    return {"checkpoint": str(out), "weights": str(weights), "backbone": converted.backbone_name,
            "dataset": checkpoint.config.data.dataset, "dim": method.dim, "n_classes": method.n_classes}
