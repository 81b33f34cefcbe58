"""Writing a Hugging Face Hub folder (``hpseg export --format hub``) and uploading it (``hpseg push``).

The folder's layout, and its one validating reader (``hpseg.load(DIR)``,
``hpseg.load("hf://owner/name[@revision]")``), are :mod:`hpseg.checkpoints.hub_folder`'s.
``backbone.safetensors`` is written only when the backbone's weights are not the official ones
(randomly initialised, a local file, an authors' checkpoint).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from hpseg.backbones import BackboneSpec
from hpseg.checkpoints.hub_folder import (
    BACKBONE,
    CARD,
    CONFIG,
    FORMAT,
    HEADS,
    OFFICIAL,
    VERSION,
    HubFolderError,
    is_hub_folder,
    read_hub_folder,
)
from hpseg.checkpoints.payload import CheckpointPayload
from hpseg.checkpoints.trained import load_trained
from hpseg.export import missing_extra
from hpseg.files import OutputFolder, atomic_write, holds_only, write_json_atomic, write_text_atomic
from hpseg.inference.segmenter import Segmenter, from_trained
from hpseg.visualize import palette

#: Licence of the official weights of each backbone family (for the model card).
WEIGHTS_LICENCE = {
    "dino": "Apache-2.0 (DINO, facebookresearch/dino)",
    "dinov2": "Apache-2.0 (DINOv2, facebookresearch/dinov2)",
    "dinov3": "DINOv3 License (facebookresearch/dinov3; accept it before use)",
    "random": "none: randomly initialised weights, stored in backbone.safetensors",
}


# ---------------------------------------------------------------------------------------- writing


def _evaluation(payload: CheckpointPayload, mapping_source: str | None) -> dict[str, Any]:
    """Metrics with how they were obtained: the mapping's evaluation, else training's validation."""
    selection = payload.selection
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
    return {"source": "validation during training" if payload.metrics else "none",
            "metrics": dict(payload.metrics), "dataset": payload.config.data.dataset,
            "step": payload.step, "checkpoint_kind": payload.kind, "selection": selection}


def _backbone_entry(spec: BackboneSpec, weights_source: str) -> dict[str, Any]:
    """Which backbone, and whether its weights are the official ones (named, not copied) or
    travel in ``backbone.safetensors``; ``weights_source`` is :class:`TrainedModel`'s."""
    official = weights_source == OFFICIAL and spec.has_official_weights
    random = weights_source == "random"
    # A local file is named, not located: the folder is published, the path means nothing elsewhere.
    file_name = Path(weights_source.split(" ")[0]).name
    if official or random:
        licence = WEIGHTS_LICENCE.get(spec.family if official else "random", "see the weights' source")
    else:
        licence = f"that of the weights it was trained with ({file_name})"
    return {"name": spec.name, "weights": OFFICIAL if official else BACKBONE,
            "source": spec.weights_source if official else ("random initialisation" if random
                                                            else f"the local file {file_name}"),
            "hf_hub_id": spec.hf_hub_id if official else None, "licence": licence,
            "patch_size": spec.patch_size, "embed_dim": spec.embed_dim}


def _hpseg_version() -> str:
    # From the installed package's metadata: importing ``hpseg.__version__`` here would close an
    # import cycle (``hpseg.load`` is this module's :func:`load`).
    try:
        return version("hpseg")
    except PackageNotFoundError:
        return "unknown (not installed)"


def hub_config(segmenter: Segmenter, payload: CheckpointPayload, weights_source: str) -> dict[str, Any]:
    """The ``config.json`` of a hub folder for ``segmenter``, loaded from the checkpoint ``payload``
    with the backbone weights of ``weights_source``."""
    method = payload.config.method
    return {
        "format": FORMAT, "version": VERSION, "hpseg_version": _hpseg_version(), "library_name": "hpseg",
        "backbone": _backbone_entry(segmenter.backbone.spec, weights_source),
        "model": {"feature_dim": segmenter.backbone.embed_dim, "dim": method.dim, "n_classes": method.n_classes,
                  "n_clusters": segmenter.n_clusters, "dropout": method.dropout},
        "tiling": {"size": segmenter.tiling.size, "window": segmenter.tiling.window, "patch": segmenter.tiling.patch},
        "class_names": list(segmenter.class_names),
        "colours": palette(len(segmenter.class_names)).tolist(),
        "cluster_to_class": segmenter.cluster_to_class,
        "mapping_source": Path(segmenter.mapping_source).name if segmenter.mapping_source else None,
        "evaluation": _evaluation(payload, segmenter.mapping_source),
        "checkpoint": {"file": Path(str(segmenter.checkpoint)).name, "kind": payload.kind,
                       "step": payload.step, "selection": payload.selection},
        "config": payload.config.to_dict(),
    }


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_write(path) as handle:
        handle.write(safetensors_bytes(data, metadata=metadata))


def export_hub(checkpoint: str | Path, out: str | Path, *, mapping: str | Path | None = "auto") -> list[Path]:
    """Write the hub folder of ``checkpoint`` (any source :func:`hpseg.load` takes) to ``out``,
    each file atomically; returns the files written.

    ``mapping``: the cluster->class mapping to store ("auto": the evaluation found beside the
    run, as ``hpseg predict``, or a hub folder's own; a results.json; None: none).
    """
    # Never over a user's own README.md / config.json.
    folder = OutputFolder(Path(out), "export --format hub",
                          earlier=lambda path: holds_only(path, (CONFIG, HEADS, BACKBONE, CARD), CONFIG) and is_hub_folder(path))
    folder.check()
    trained = load_trained(checkpoint, device="cpu")
    segmenter = from_trained(trained, mapping=mapping)
    config = hub_config(segmenter, trained.payload, trained.weights_source)
    out = folder.claim()
    _write_safetensors(segmenter.model.state_dict(), out / HEADS, metadata={"format": FORMAT})
    written = [out / CONFIG, out / HEADS]
    if config["backbone"]["weights"] == BACKBONE:
        _write_safetensors(segmenter.backbone.model.state_dict(), out / BACKBONE)
        written.append(out / BACKBONE)
    else:
        (out / BACKBONE).unlink(missing_ok=True)  # a stale file would contradict config.json
    write_json_atomic(config, out / CONFIG)
    write_text_atomic(model_card(config), out / CARD)
    return [*written, out / CARD]


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


# ---------------------------------------------------------------------------------------- pushing


def push_operations(folder: str | Path) -> list[Any]:
    """The ``CommitOperationAdd`` of every file of a hub folder (hidden and temporary files left out)."""
    try:
        from huggingface_hub import CommitOperationAdd  # lazy: optional extra
    except ImportError as error:
        raise missing_extra("hub", "huggingface_hub", error) from None
    folder = Path(folder)
    if not is_hub_folder(folder):
        raise HubFolderError(f"{folder} is not a folder written by `hpseg export --format hub` (no {CONFIG})")
    read_hub_folder(folder)  # every entry checked: a damaged folder is not uploaded
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
