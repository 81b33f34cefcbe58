"""The Hugging Face Hub folder format: ``hpseg export --format hub``, ``hpseg.load(DIR)``,
``hpseg.load("hf://owner/name[@revision]")`` and ``hpseg push``.

A folder (push it as it is)::

    config.json          format marker, backbone (name, weights source, licence), model sizes,
                         tiling, class names and colours, cluster->class mapping, evaluation
                         results with their checkpoint-selection rule, the run's config
    model.safetensors    the heads (state dict of HiddenPositivesModel)
    backbone.safetensors the backbone's weights, only when they are not the official ones
                         (randomly initialised, a local file, an authors' checkpoint)
    README.md            the model card

Only JSON and safetensors are read back: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from hpseg.backbones import BackboneSpec, create_backbone
from hpseg.checkpoints.mapping import read_mapping
from hpseg.checkpoints.trained import load_trained
from hpseg.errors import InvalidInputError
from hpseg.export import missing_extra
from hpseg.files import atomic_write, write_json_atomic, write_text_atomic
from hpseg.inference.segmenter import Segmenter, from_trained
from hpseg.inference.segmenter import load as load_checkpoint
from hpseg.inference.tiling import Tiling
from hpseg.method.model import HiddenPositivesModel
from hpseg.runtime import resolve_device
from hpseg.visualize import palette

FORMAT = "hpseg-hub"
VERSION = 1
CONFIG, HEADS, BACKBONE, CARD = "config.json", "model.safetensors", "backbone.safetensors", "README.md"
_REFERENCE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")

#: Licence of the official weights of each backbone family (for the model card).
WEIGHTS_LICENCE = {
    "dino": "Apache-2.0 (DINO, facebookresearch/dino)",
    "dinov2": "Apache-2.0 (DINOv2, facebookresearch/dinov2)",
    "dinov3": "DINOv3 License (facebookresearch/dinov3; accept it before use)",
    "random": "none: randomly initialised weights, stored in backbone.safetensors",
}


# ---------------------------------------------------------------------------------------- writing


def _evaluation(payload: dict[str, Any], mapping_source: str | None) -> dict[str, Any]:
    """Metrics with how they were obtained: the mapping's evaluation, else training's validation."""
    selection = payload.get("selection") or "unknown"
    if mapping_source and mapping_source.endswith(".json"):
        try:
            results = json.loads(Path(mapping_source).read_text())
        except (OSError, ValueError):
            results = None
        if isinstance(results, dict) and "hp" in results:
            return {"source": f"hpseg eval ({Path(mapping_source).name})", "metrics": results["hp"],
                    "dataset": results.get("dataset"), "n_images": results.get("n_images"),
                    "crf": results.get("crf"), "step": results.get("step"),
                    "checkpoint_kind": results.get("checkpoint_kind"), "selection": selection,
                    "protocol": "unsupervised: Hungarian matching of clusters to classes; linear: the linear probe"}
    return {"source": "validation during training" if payload.get("metrics") else "none",
            "metrics": dict(payload.get("metrics") or {}), "dataset": payload["config"]["data"]["dataset"],
            "step": payload.get("step"), "checkpoint_kind": payload.get("kind"), "selection": selection}


def _backbone_entry(spec: BackboneSpec, weights_source: str) -> dict[str, Any]:
    """Which backbone, and whether its weights are the official ones (named, not copied) or
    travel in ``backbone.safetensors``; ``weights_source`` is :class:`TrainedModel`'s."""
    official = weights_source == "official" and spec.has_official_weights
    random = weights_source == "random"
    if official or random:
        licence = WEIGHTS_LICENCE.get(spec.family if official else "random", "see the weights' source")
    else:
        licence = f"that of the weights it was trained with ({Path(weights_source.split(' ')[0]).name})"
    return {"name": spec.name, "weights": "official" if official else BACKBONE,
            "source": spec.weights_source if official else ("random initialisation" if random else weights_source),
            "hf_hub_id": spec.hf_hub_id if official else None, "licence": licence,
            "patch_size": spec.patch_size, "embed_dim": spec.embed_dim}


def _hpseg_version() -> str:
    # From the installed package's metadata: importing ``hpseg.__version__`` here would close an
    # import cycle (``hpseg.load`` is this module's :func:`load`).
    try:
        return version("hpseg")
    except PackageNotFoundError:
        return "unknown (not installed)"


def hub_config(segmenter: Segmenter, payload: dict[str, Any], weights_source: str) -> dict[str, Any]:
    """The ``config.json`` of a hub folder for ``segmenter``, loaded from the checkpoint ``payload``
    with the backbone weights of ``weights_source``."""
    method = payload["config"]["method"]
    return {
        "format": FORMAT, "version": VERSION, "hpseg_version": _hpseg_version(), "library_name": "hpseg",
        "backbone": _backbone_entry(segmenter.backbone.spec, weights_source),
        "model": {"feature_dim": segmenter.backbone.embed_dim, "dim": method["dim"], "n_classes": method["n_classes"],
                  "n_clusters": segmenter.n_clusters, "dropout": method.get("dropout", 0.1)},
        "tiling": {"size": segmenter.tiling.size, "window": segmenter.tiling.window, "patch": segmenter.tiling.patch},
        "class_names": list(segmenter.class_names),
        "colours": palette(len(segmenter.class_names)).tolist(),
        "cluster_to_class": segmenter.cluster_to_class,
        "mapping_source": Path(segmenter.mapping_source).name if segmenter.mapping_source else None,
        "evaluation": _evaluation(payload, segmenter.mapping_source),
        "checkpoint": {"file": Path(str(segmenter.checkpoint)).name, "kind": payload.get("kind"),
                       "step": payload.get("step"), "selection": payload.get("selection")},
        "config": payload["config"],
    }


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_write(path) as handle:
        handle.write(safetensors_bytes(data, metadata=metadata))


def export_hub(checkpoint: str | Path, out: str | Path, *, mapping: str | Path | None = "auto") -> Path:
    """Write the hub folder of ``checkpoint`` to ``out`` (each file atomically); returns ``out``.

    ``mapping``: the cluster->class mapping to store ("auto": the evaluation found beside the
    run, as ``hpseg predict``; a results.json; None: none).
    """
    out = Path(out)
    trained = load_trained(checkpoint, device="cpu")
    segmenter = from_trained(trained, mapping=mapping)
    config = hub_config(segmenter, trained.payload, trained.weights_source)
    _write_safetensors(segmenter.model.state_dict(), out / HEADS, metadata={"format": FORMAT})
    if config["backbone"]["weights"] == BACKBONE:
        _write_safetensors(segmenter.backbone.model.state_dict(), out / BACKBONE)
    else:
        (out / BACKBONE).unlink(missing_ok=True)  # a stale file would contradict config.json
    write_json_atomic(config, out / CONFIG)
    write_text_atomic(model_card(config), out / CARD)
    return out


# ---------------------------------------------------------------------------------------- model card

CITATION = """@inproceedings{seong2023hiddenpositives,
  title     = {Leveraging Hidden Positives for Unsupervised Semantic Segmentation},
  author    = {Seong, Hyun Seok and Moon, WonJun and Lee, SuBeen and Heo, Jae-Pil},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}"""


def _metrics_table(evaluation: dict[str, Any]) -> str:
    metrics = {k: v for k, v in evaluation.get("metrics", {}).items() if isinstance(v, (int, float))}
    if not metrics:
        return "No evaluation was recorded for this checkpoint (run `hpseg eval` on it, then export again).\n"
    rows = "\n".join(f"| {key.replace('_', ' ')} | {100 * value:.2f} |" for key, value in metrics.items())
    how = ", ".join(f"{k}: {evaluation[k]}" for k in ("source", "dataset", "n_images", "crf", "step",
                                                       "checkpoint_kind") if evaluation.get(k) is not None)
    return (f"| metric | % |\n|---|---|\n{rows}\n\nHow they were obtained: {how}. Checkpoint selection: "
            f"{evaluation.get('selection')}. {evaluation.get('protocol', '')}\n")


def model_card(config: dict[str, Any]) -> str:
    """The README.md of a hub folder: what it is, metrics and how, how to load, citation, licence."""
    backbone, model = config["backbone"], config["model"]
    classes = ", ".join(config["class_names"])
    mapping = ("the Hungarian cluster->class mapping of its evaluation is included (cluster ids come out "
               "as class ids)" if config["cluster_to_class"] else "no cluster->class mapping (the cluster "
               "head gives cluster ids)")
    return f"""---
library_name: hpseg
pipeline_tag: image-segmentation
tags: [unsupervised-semantic-segmentation, hidden-positives, {backbone['name']}]
---

# HP segmenter on {backbone['name']}

An unsupervised semantic segmentation model trained with hpseg — HP, "Leveraging Hidden Positives for Unsupervised Semantic
Segmentation" (CVPR 2023): a segmentation head (D = {model['dim']}) on the frozen backbone
`{backbone['name']}`, a cluster head of {model['n_clusters']} clusters and a linear probe over
{model['n_classes']} classes ({classes}). Dataset: {config['evaluation'].get('dataset')}; {mapping}.

Backbone weights: {backbone['source']}.

## Metrics

{_metrics_table(config['evaluation'])}
## How to use it

```python
import hpseg
from PIL import Image

segmenter = hpseg.load("hf://OWNER/NAME", mapping="auto")    # or a local copy of this folder
labels = segmenter.segment(Image.open("photo.jpg"))          # (H, W) class ids
```

or `hpseg predict photos/ --checkpoint hf://OWNER/NAME --out preds/`, or
`hpseg app --checkpoint hf://OWNER/NAME`. Images are resized to a shorter side of
{config['tiling']['size']} px and segmented in windows of {config['tiling']['window']} px
(patch {config['tiling']['patch']}).

## Citation

```bibtex
{CITATION}
```

## Licence

Backbone weights: {backbone['licence']}. The heads are released with this repository.
"""


# ---------------------------------------------------------------------------------------- reading


def is_hub_folder(path: str | Path) -> bool:
    config = Path(path) / CONFIG
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def resolve_reference(reference: str) -> Path:
    """``hf://owner/name[@revision]`` -> the snapshot folder in the Hugging Face cache.

    Goes through ``huggingface_hub.snapshot_download`` (the usual cache, ``HF_HUB_CACHE``,
    ``HF_HUB_OFFLINE`` and the user's token honoured). Raises ValueError naming the repository
    when it is neither cached nor reachable.
    """
    match = _REFERENCE.match(reference)
    if match is None:
        raise InvalidInputError(f"{reference!r} is not a Hub reference of the form hf://owner/name[@revision]")
    repo, revision = match["repo"], match["revision"]
    try:
        # Lazy: an optional extra, only needed for hf:// references.
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as error:
        raise missing_extra("hub", "huggingface_hub", error) from None
    try:
        return Path(snapshot_download(repo, revision=revision, repo_type="model"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        where = f"{repo}@{revision}" if revision else repo
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise InvalidInputError(f"hf://{where}: the repository is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                         f"and cannot be downloaded{offline}: {type(error).__name__}: {error}") from None


def hub_folder(checkpoint: str | Path) -> Path | None:
    """The hub folder ``checkpoint`` names (an ``hf://`` reference is fetched), or None when it
    is a checkpoint file."""
    if str(checkpoint).startswith("hf://"):
        folder = resolve_reference(str(checkpoint))
        if not is_hub_folder(folder):
            raise InvalidInputError(f"{checkpoint}: no hpseg {CONFIG} (format {FORMAT!r}) in the repository")
        return folder
    path = Path(checkpoint)
    if path.is_dir():
        if not is_hub_folder(path):
            raise InvalidInputError(f"{path} is a folder without an hpseg {CONFIG} (format {FORMAT!r}): "
                             "expected a checkpoint file or a folder written by `hpseg export --format hub`")
        return path
    return None


def read_hub_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"{folder / CONFIG}: not readable JSON ({error})") from None
    if config.get("version", 0) > VERSION:
        raise InvalidInputError(f"{folder / CONFIG} was written by a newer hpseg (format version {config['version']})")
    return config


def load_hub(folder: Path, *, device: str = "auto", weights: str | None = None, mapping: str | Path | None = None,
             crf: bool = False, size: int | None = None, window: int | None = None, batch_size: int = 8,
             label: str | None = None) -> Segmenter:
    """A :class:`Segmenter` from a hub folder (the arguments are :func:`load`'s; ``mapping="auto"``
    is the folder's stored mapping; ``label`` names the folder, e.g. its ``hf://`` reference)."""
    config = read_hub_config(folder)
    spec, sizes = config["backbone"], config["model"]
    if weights:
        backbone = create_backbone(spec["name"], weights=weights)
    elif spec["weights"] == "official":
        backbone = create_backbone(spec["name"], pretrained=True)
    else:
        backbone = create_backbone(spec["name"], weights=folder / BACKBONE)
    with torch.random.fork_rng(devices=[]):  # the initial values are overwritten: leave the caller's RNG be
        model = HiddenPositivesModel(backbone.embed_dim, sizes["dim"], sizes["n_classes"], sizes.get("dropout", 0.1))
    try:
        model.load_state_dict(load_file(str(folder / HEADS)))
    except (OSError, RuntimeError) as error:
        raise InvalidInputError(f"{folder / HEADS}: the heads do not load into D={sizes['dim']}, "
                         f"{sizes['n_classes']} classes on {spec['name']!r}: {error}") from None
    cluster_to_class, source = None, None
    if mapping == "auto" and config.get("cluster_to_class") is not None:
        cluster_to_class, source = list(config["cluster_to_class"]), f"{label or folder}/{CONFIG}"
    elif mapping not in (None, "auto"):
        cluster_to_class = read_mapping(mapping, sizes["n_clusters"], sizes["n_classes"])
        source = str(mapping)
    torch_device = resolve_device(device)
    tiling = Tiling.create(config["tiling"]["size"] if size is None else size, window, backbone.patch_size)
    return Segmenter(model.to(torch_device).eval(), backbone.to(torch_device), class_names=config["class_names"],
                     tiling=tiling, device=torch_device, cluster_to_class=cluster_to_class, mapping_source=source,
                     checkpoint=label or str(folder), batch_size=batch_size, crf=crf)


def load(checkpoint: str | Path, device: str = "auto", weights: str | None = None, *,
         mapping: str | Path | None = None, crf: bool = False, size: int | None = None, window: int | None = None,
         batch_size: int = 8) -> Segmenter:
    """``hpseg.load``: :func:`hpseg.inference.segmenter.load` (its arguments), and a hub folder.

    ``checkpoint`` may also be a folder written by ``hpseg export --format hub`` or
    ``"hf://owner/name[@revision]"`` (that folder on the Hugging Face Hub, through its cache);
    ``mapping="auto"`` then uses the mapping stored in it.
    """
    options = {"mapping": mapping, "crf": crf, "size": size, "window": window, "batch_size": batch_size}
    folder = hub_folder(checkpoint)
    if folder is None:
        return load_checkpoint(checkpoint, device, weights, **options)
    return load_hub(folder, device=device, weights=weights, label=str(checkpoint), **options)


# ---------------------------------------------------------------------------------------- pushing


def push_operations(folder: str | Path) -> list[Any]:
    """The ``CommitOperationAdd`` of every file of a hub folder (hidden and temporary files left out)."""
    try:
        from huggingface_hub import CommitOperationAdd  # lazy: optional extra
    except ImportError as error:
        raise missing_extra("hub", "huggingface_hub", error) from None
    folder = Path(folder)
    if not is_hub_folder(folder):
        raise InvalidInputError(f"{folder} is not a folder written by `hpseg export --format hub` (no hpseg {CONFIG})")
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]


def push(folder: str | Path, repo_id: str, *, private: bool = False, message: str | None = None,
         token: str | None = None, api: Any = None) -> Any:
    """Upload a hub folder to ``repo_id`` in one commit (creating the repository if needed).

    The token: ``token``, else the ``HF_TOKEN`` variable or the one saved by ``hf auth login``
    (huggingface_hub's own rules). ``api`` replaces ``HfApi`` (tests). Returns the commit info.
    """
    operations = push_operations(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.create_commit(repo_id, operations, commit_message=message or f"hpseg model from {Path(folder).name}",
                             repo_type="model")
