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
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpseg.export import missing_extra

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


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it into place."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _checkpoint_payload(path: Path) -> dict[str, Any]:
    """The hpseg checkpoint dict of ``path`` (an authors' file converted in memory)."""
    from hpseg.checkpoint import FORMAT as CHECKPOINT_FORMAT
    from hpseg.checkpoint import load_checkpoint, read_torch_file

    payload = read_torch_file(path)
    if isinstance(payload, dict) and payload.get("format") != CHECKPOINT_FORMAT and "net_model_state_dict" in payload:
        from hpseg.reference_checkpoint import convert_reference

        converted = convert_reference(payload, path).checkpoint
        converted["backbone"]["weights"] = str(path)  # the authors' file carries its own backbone weights
        return converted
    return load_checkpoint(path)


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


def _backbone_entry(segmenter: Any, payload: dict[str, Any]) -> dict[str, Any]:
    spec = segmenter.backbone.spec
    stored = payload.get("backbone") or {}
    official = bool(stored.get("pretrained")) and not stored.get("weights") and spec.has_official_weights
    licence = WEIGHTS_LICENCE.get(spec.family, "see the weights' source") if official or spec.family == "random" \
        else f"that of the weights file it was trained with ({Path(str(stored.get('weights'))).name})"
    return {"name": spec.name, "weights": "official" if official else BACKBONE,
            "source": spec.weights_source if official else (stored.get("weights") or "random initialisation"),
            "hf_hub_id": spec.hf_hub_id if official else None, "licence": licence,
            "patch_size": spec.patch_size, "embed_dim": spec.embed_dim}


def hub_config(segmenter: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a hub folder for ``segmenter`` (loaded from ``payload``)."""
    from hpseg import __version__
    from hpseg.visualize import palette

    method = payload["config"]["method"]
    return {
        "format": FORMAT, "version": VERSION, "hpseg_version": __version__, "library_name": "hpseg",
        "backbone": _backbone_entry(segmenter, payload),
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


def export_hub(checkpoint: str | Path, out: str | Path, *, mapping: str | Path | None = "auto",
               echo: Callable[[str], None] | None = None) -> Path:
    """Write the hub folder of ``checkpoint`` to ``out`` (each file atomically); returns ``out``.

    ``mapping``: the cluster->class mapping to store ("auto": the evaluation found beside the
    run, as ``hpseg predict``; a results.json; None: none).
    """
    from safetensors.torch import save_file

    from hpseg.api import load

    checkpoint, out = Path(checkpoint), Path(out)
    segmenter = load(checkpoint, device="cpu", mapping=mapping, echo=echo)
    payload = _checkpoint_payload(checkpoint)
    config = hub_config(segmenter, payload)
    out.mkdir(parents=True, exist_ok=True)
    heads = {k: v.detach().cpu().contiguous() for k, v in segmenter.model.state_dict().items()}
    _write_atomic(out / HEADS, lambda path: save_file(heads, str(path), metadata={"format": FORMAT}))
    if config["backbone"]["weights"] == BACKBONE:
        weights = {k: v.detach().cpu().contiguous() for k, v in segmenter.backbone.model.state_dict().items()}
        _write_atomic(out / BACKBONE, lambda path: save_file(weights, str(path)))
    else:
        (out / BACKBONE).unlink(missing_ok=True)  # a stale file would contradict config.json
    _write_atomic(out / CONFIG, lambda path: path.write_text(json.dumps(config, indent=2) + "\n"))
    _write_atomic(out / CARD, lambda path: path.write_text(model_card(config)))
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
        raise ValueError(f"{reference!r} is not a Hub reference of the form hf://owner/name[@revision]")
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
        raise ValueError(f"hf://{where}: the repository is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                         f"and cannot be downloaded{offline}: {type(error).__name__}: {error}") from None


def hub_folder(checkpoint: str | Path) -> Path | None:
    """The hub folder ``checkpoint`` names (an ``hf://`` reference is fetched), or None when it
    is a checkpoint file."""
    if str(checkpoint).startswith("hf://"):
        folder = resolve_reference(str(checkpoint))
        if not is_hub_folder(folder):
            raise ValueError(f"{checkpoint}: no hpseg {CONFIG} (format {FORMAT!r}) in the repository")
        return folder
    path = Path(checkpoint)
    if path.is_dir():
        if not is_hub_folder(path):
            raise ValueError(f"{path} is a folder without an hpseg {CONFIG} (format {FORMAT!r}): "
                             "expected a checkpoint file or a folder written by `hpseg export --format hub`")
        return path
    return None


def read_hub_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder / CONFIG}: not readable JSON ({error})") from None
    if config.get("version", 0) > VERSION:
        raise ValueError(f"{folder / CONFIG} was written by a newer hpseg (format version {config['version']})")
    return config


def load_hub(folder: Path, *, device: str = "auto", weights: str | None = None, mapping: Any = None,
             size: int | None = None, window: int | None = None, batch_size: int = 8,
             label: str | None = None) -> Any:
    """A :class:`hpseg.api.Segmenter` from a hub folder (see :func:`hpseg.api.load` for the
    arguments; ``mapping="auto"`` is the folder's stored mapping)."""
    from safetensors.torch import load_file

    from hpseg.api import Segmenter, read_mapping
    from hpseg.backbones import create_backbone
    from hpseg.method.model import HiddenPositivesModel
    from hpseg.predict import Tiling
    from hpseg.runtime import resolve_device

    config = read_hub_config(folder)
    spec, sizes = config["backbone"], config["model"]
    if weights:
        backbone = create_backbone(spec["name"], weights=weights)
    elif spec["weights"] == "official":
        backbone = create_backbone(spec["name"], pretrained=True)
    else:
        backbone = create_backbone(spec["name"], weights=folder / BACKBONE)
    model = HiddenPositivesModel(backbone.embed_dim, sizes["dim"], sizes["n_classes"], sizes.get("dropout", 0.1))
    try:
        model.load_state_dict(load_file(str(folder / HEADS)))
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{folder / HEADS}: the heads do not load into D={sizes['dim']}, "
                         f"{sizes['n_classes']} classes on {spec['name']!r}: {error}") from None
    cluster_to_class, source = None, None
    if mapping == "auto" and config.get("cluster_to_class") is not None:
        cluster_to_class, source = list(config["cluster_to_class"]), f"{label or folder}/{CONFIG}"
    elif mapping not in (None, "auto"):
        cluster_to_class = read_mapping(mapping, sizes["n_clusters"], sizes["n_classes"])
        source = str(mapping)
    torch_device = resolve_device(device)
    tiling = Tiling.create(config["tiling"]["size"] if size is None else size, window, backbone.patch_size)
    return Segmenter(model.to(torch_device), backbone.to(torch_device), class_names=config["class_names"],
                     tiling=tiling, device=torch_device, cluster_to_class=cluster_to_class, mapping_source=source,
                     checkpoint=label or str(folder), batch_size=batch_size)


# ---------------------------------------------------------------------------------------- pushing


def push_operations(folder: str | Path) -> list[Any]:
    """The ``CommitOperationAdd`` of every file of a hub folder (hidden and temporary files left out)."""
    try:
        from huggingface_hub import CommitOperationAdd  # lazy: optional extra
    except ImportError as error:
        raise missing_extra("hub", "huggingface_hub", error) from None
    folder = Path(folder)
    if not is_hub_folder(folder):
        raise ValueError(f"{folder} is not a folder written by `hpseg export --format hub` (no hpseg {CONFIG})")
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
