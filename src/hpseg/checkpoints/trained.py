"""One loader for trained models: ``load_trained(path, device, weights) -> TrainedModel``.

``hpseg.load``, ``hpseg eval`` and ``hpseg predict`` all go through :func:`load_trained`; resume
can use its first half, :func:`read_trained` (the file read once, checked, with its config). It

1. reads the file once (weights-only) and converts an authors' reference checkpoint in memory;
2. resolves the backbone, in order: ``weights=`` given by the caller; for a reference file, the
   backbone tensors inside it; the checkpoint's ``backbone.weights`` file, looked up beside the
   checkpoint too when the folder moved (``hpseg import-checkpoint`` writes the weights beside
   the checkpoint, and a run records an absolute path); the official weights (Hugging Face
   cache); or -- for a run trained on a randomly initialised backbone -- the same
   deterministic random initialisation;
3. builds the heads and loads their weights strictly, without touching the caller's random
   number generator;
4. picks the inference precision for the device it runs on (:func:`inference_dtype`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpseg.backbones import Backbone, BackboneWeightsError, create_backbone
from hpseg.checkpoints.mapping import find_mapping, read_mapping
from hpseg.checkpoints.reference import ConvertedReference, convert_reference, is_reference_checkpoint
from hpseg.checkpoints.runs import resolve_checkpoint
from hpseg.checkpoints.store import CheckpointError, check_format, read_torch_file
from hpseg.config import Config
from hpseg.method.model import HiddenPositivesModel
from hpseg.runtime import amp_dtype, resolve_device

__all__ = ["TrainedCheckpoint", "TrainedModel", "inference_dtype", "load_trained", "read_trained"]

logger = logging.getLogger(__name__)


def inference_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for running a model trained with ``train.amp=amp`` on ``device``.

    The training setting is kept where the device runs it, so that evaluating on the training
    device reproduces training's validation; float16 autocast needs CUDA, so a model trained in
    float16 on a GPU runs in float32 on the CPU (None: no autocast).
    """
    if amp in ("auto", "fp16") and device.type != "cuda":
        return None
    return amp_dtype(amp, device)


@dataclass
class TrainedCheckpoint:
    """A checkpoint file read once: its hpseg payload (converted, for a reference file) and config.

    ``reference`` holds the conversion of an authors' reference checkpoint (its backbone
    tensors), None for an hpseg checkpoint.
    """

    path: Path
    payload: dict[str, Any]
    config: Config
    reference: ConvertedReference | None = None

    @property
    def step(self) -> Any:
        return self.payload.get("step")

    @property
    def kind(self) -> str:
        return str(self.payload.get("kind", "checkpoint"))

    @property
    def resumable(self) -> bool:
        """Whether the file holds the optimiser and pool state to continue training."""
        return "training" in self.payload

    @property
    def class_names(self) -> list[str]:
        """The dataset's class names (generic ``"class k"`` when the checkpoint has none)."""
        n_classes = self.config.method.n_classes
        return list(self.payload.get("class_names") or [f"class {k}" for k in range(n_classes)])


def read_trained(path: str | Path) -> TrainedCheckpoint:
    """Read ``path`` once: an hpseg checkpoint, or an authors' reference one (converted in memory);
    a run folder stands for the checkpoint its ``train.selection`` chose."""
    path = resolve_checkpoint(path)
    raw = read_torch_file(path)
    reference = None
    if is_reference_checkpoint(raw):
        reference = convert_reference(raw, path)
        payload = reference.checkpoint
        logger.info("%s: an authors' reference checkpoint, converted in memory (backbone %s; "
                    "`hpseg import-checkpoint` converts it once for all)", path, reference.backbone_name)
    else:
        payload = check_format(raw, path)
    if not isinstance(payload.get("config"), dict):
        raise CheckpointError(f"{path}: incomplete hpseg checkpoint (no 'config' entry: the run's settings are "
                              "needed to rebuild the model)")
    try:
        config = Config.from_dict(payload["config"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: the config inside it is invalid: {error}") from None
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path}: incomplete hpseg checkpoint (no model weights)")
    return TrainedCheckpoint(path, payload, config, reference)


def _stored_weights(checkpoint: TrainedCheckpoint, stored: str) -> Path:
    """The recorded weights file, or the file of that name beside the checkpoint (the folder moved)."""
    path, beside = Path(stored), checkpoint.path.parent / Path(stored).name
    if path.is_file():
        return path
    if beside.is_file():
        return beside
    raise BackboneWeightsError(
        f"{checkpoint.path}: the backbone weights it was trained with, {path}, are missing (not there, "
        f"nor beside the checkpoint as {beside}); pass the file with --weights FILE (weights= in Python)")


#: Names whose official file changed: a checkpoint written before the change records no
#: ``official_weights`` and was trained on the earlier file, registered now under this name
#: (hpseg's ``dino_vits8`` was DINO's 800-epoch file before it became the paper's 300-epoch one).
_EARLIER_OFFICIAL = {"dino_vits8": "dino_vits8_800ep"}


def _official_name(recorded: dict[str, Any], name: str, path: Path) -> str:
    """The registered name whose official weights ``recorded`` (a checkpoint's ``backbone``) was trained on."""
    if name not in _EARLIER_OFFICIAL or "official_weights" in recorded:
        return name
    earlier = _EARLIER_OFFICIAL[name]
    logger.warning("%s was trained on %s's official weights before hpseg switched that name to the paper's "
                   "300-epoch file: rebuilding the weights it was trained on, %r", path, name, earlier)
    return earlier


def resolve_backbone(checkpoint: TrainedCheckpoint, weights: str | Path | None = None) -> tuple[Backbone, str]:
    """The backbone ``checkpoint`` was trained on and where its weights came from (a file,
    ``"official"`` or ``"random"``); the order is the module docstring's."""
    recorded = checkpoint.payload.get("backbone") or {}
    config = checkpoint.config.backbone
    name = recorded.get("name") or config.name
    if weights:
        return create_backbone(name, weights=weights), str(weights)
    if checkpoint.reference is not None:
        return checkpoint.reference.backbone(), f"{checkpoint.path} (the reference checkpoint's own tensors)"
    stored = recorded.get("weights") or config.weights
    if stored:
        path = _stored_weights(checkpoint, stored)
        return create_backbone(name, weights=path), str(path)
    if recorded.get("pretrained", config.pretrained):
        return create_backbone(_official_name(recorded, name, checkpoint.path), pretrained=True), "official"
    # A random backbone is not stored in the checkpoint; hpseg's random initialisation is
    # deterministic (a fixed seed), so this rebuilds the network training used.
    logger.info("%s: the backbone %r was randomly initialised; rebuilding the same random network "
                "(exact with the same torch and timm versions)", checkpoint.path, name)
    return create_backbone(name, pretrained=False), "random"


def _trained_heads(checkpoint: TrainedCheckpoint, backbone: Backbone) -> HiddenPositivesModel:
    """S, S', P and the probes with the checkpoint's weights, checked against the backbone's width."""
    method = checkpoint.config.method
    # The initial values are all overwritten: build them without advancing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = HiddenPositivesModel(backbone.embed_dim, method.dim, method.n_classes, method.dropout,
                                     n_clusters=checkpoint.config.n_clusters)
    try:
        model.load_state_dict(checkpoint.payload["model"])
    except RuntimeError as error:
        raise CheckpointError(f"{checkpoint.path}: the model weights do not fit backbone {backbone.spec.name!r} and "
                              f"the config inside it (dim {method.dim}, {method.n_classes} classes): "
                              f"{weight_mismatch_summary(str(error))}") from None
    return model


def weight_mismatch_summary(message: str, shown: int = 3) -> str:
    """``load_state_dict``'s error (a line per tensor) in one line: the first ``shown`` problems
    and how many more, e.g. ``cluster_probe.centroids is [4, 16] in the file, [4, 8] for the config``."""
    problems = []
    for line in message.splitlines():
        line = line.strip()
        size = re.match(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
                        r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)", line)
        if size:
            problems.append(f"{size[1]} is {size[2]} in the file, {size[3]} for the config")
        elif line.startswith(("Missing key(s)", "Unexpected key(s)")):
            problems.append(line.split(" in state_dict")[0].lower() + ": " + line.split(":", 1)[1].strip())
    if not problems:
        return message
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


@dataclass
class TrainedModel:
    """A trained HP model on its device, ready to run: the heads (in eval mode), the frozen
    backbone, the checkpoint they came from and the precision to run them in."""

    checkpoint: TrainedCheckpoint
    model: HiddenPositivesModel
    backbone: Backbone
    device: torch.device
    amp_dtype: torch.dtype | None
    weights_source: str

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def payload(self) -> dict[str, Any]:
        return self.checkpoint.payload

    @property
    def config(self) -> Config:
        return self.checkpoint.config

    @property
    def class_names(self) -> list[str]:
        return self.checkpoint.class_names

    @property
    def random_backbone(self) -> bool:
        """Whether the backbone is a random initialisation: rebuilt as such, recorded as not
        pretrained (the demo saves its random network to a file), or one with no trained weights."""
        return (self.weights_source == "random" or not self.config.backbone.pretrained
                or self.backbone.spec.family == "random")

    @property
    def n_clusters(self) -> int:
        return int(self.model.cluster_probe.centroids.shape[0])

    def find_mapping(self, crf: bool = False) -> Path | None:
        """An evaluation of this checkpoint recorded beside it (see :func:`hpseg.checkpoints.mapping.find_mapping`)."""
        return find_mapping(self.path, self.checkpoint.step, crf)

    def read_mapping(self, path: str | Path) -> list[int]:
        """The cluster -> class list in ``path``, checked against this model's sizes and step."""
        return read_mapping(path, self.n_clusters, self.config.method.n_classes, self.checkpoint.step)


def load_trained(path: str | Path, device: str = "auto", weights: str | Path | None = None) -> TrainedModel:
    """Load a trained model for inference on ``device`` (``"auto"``: CUDA when available).

    ``weights``: a local backbone weights file, overriding the checkpoint's.
    """
    checkpoint = read_trained(path)
    torch_device = resolve_device(device)
    backbone, source = resolve_backbone(checkpoint, weights)
    model = _trained_heads(checkpoint, backbone)
    return TrainedModel(checkpoint, model.to(torch_device).eval(), backbone.to(torch_device), torch_device,
                        inference_dtype(checkpoint.config.train.amp, torch_device), source)
