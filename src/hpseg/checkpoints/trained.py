"""The one loader of trained models: ``load_trained(source, device, weights) -> TrainedModel``.

``hpseg.load``, ``predict``, ``eval``, ``app``, ``export`` and ``clusters`` all go through
:func:`load_trained`; resume uses its first half, :func:`read_trained` (the source read once and
checked, with its config). It

1. resolves what the user named (:func:`hpseg.checkpoints.sources.resolve_source`: a checkpoint
   file, a run folder, a hub folder or an ``hf://`` name) and reads it once: a checkpoint file
   weights-only (an authors' checkpoint converted in memory), a hub folder through its
   validating reader (JSON and safetensors only);
2. resolves the backbone, in order: ``weights=`` given by the caller; for an authors' file, the
   backbone tensors inside it; the checkpoint's ``backbone.weights`` file (a hub folder's
   ``backbone.safetensors``), looked up beside the checkpoint too when the folder moved
   (``hpseg import-checkpoint`` writes the weights beside the checkpoint, and a run records an
   absolute path); the official weights (Hugging Face cache); or -- for a run trained on a
   randomly initialised backbone -- the same deterministic random initialisation;
3. builds the heads (with the run's cluster count) and loads their weights strictly, without
   touching the caller's random number generator;
4. picks the inference precision of the run's ``train.amp`` for the device it runs on
   (:func:`inference_dtype`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from hpseg.backbones import Backbone, BackboneWeightsError, create_backbone
from hpseg.checkpoints.authors import ConvertedAuthors, convert_authors, is_authors_checkpoint
from hpseg.checkpoints.hf_names import HF_SCHEME
from hpseg.checkpoints.hub_folder import CONFIG, HubFolder, read_hub_folder
from hpseg.checkpoints.mapping import evaluation_dir, find_mapping, read_mapping
from hpseg.checkpoints.payload import BackboneRecord, CheckpointPayload
from hpseg.checkpoints.released import ReleasedModel
from hpseg.checkpoints.sources import Source, SourceKind, resolve_source
from hpseg.checkpoints.store import CheckpointError, read_torch_file
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
    """A source read once: its typed payload and where it came from.

    ``authors`` holds the conversion of an authors' checkpoint (its backbone tensors), ``hub``
    the checked hub folder (its stored mapping and image size); both None for an hpseg
    checkpoint file.
    """

    source: Source
    payload: CheckpointPayload
    authors: ConvertedAuthors | None = None
    hub: HubFolder | None = None

    @property
    def path(self) -> Path:
        """The checkpoint file read (a run folder's chosen one), or the hub folder."""
        return self.source.path

    @property
    def label(self) -> str:
        """How outputs name the model: the checkpoint file, or the hub folder / ``hf://`` name given."""
        return self.source.name if self.hub is not None else str(self.path)

    @property
    def config(self) -> Config:
        return self.payload.config

    @property
    def released(self) -> ReleasedModel | None:
        """The authors' released model the source names (:mod:`hpseg.checkpoints.released`), if any."""
        return self.source.released

    @property
    def step(self) -> int | None:
        return self.payload.step

    @property
    def class_names(self) -> list[str]:
        """The dataset's class names (generic ``"class k"`` when the checkpoint has none)."""
        return self.payload.class_names or [f"class {k}" for k in range(self.config.method.n_classes)]

    def evaluation_dir(self, crf: bool = False) -> Path:
        """Where ``hpseg eval`` writes by default: :func:`hpseg.checkpoints.mapping.evaluation_dir`
        of the file or folder, and for an ``hf://`` or released model's name ``eval-<owner>--<name>``
        in the current folder (never inside a download cache)."""
        if self.source.kind in (SourceKind.HF, SourceKind.RELEASED):
            name = self.source.name.removeprefix(HF_SCHEME).replace("/", "--").replace("@", "-")
            return Path(f"eval-{name}{'-crf' if crf else ''}")
        return evaluation_dir(self.path, crf)

    @property
    def default_size(self) -> int:
        """The shorter side images are resized to unless told: the hub folder's, else ``data.val_size``."""
        return self.hub.size if self.hub is not None else int(self.config.data.val_size)


def _read_file(source: Source) -> TrainedCheckpoint:
    raw = read_torch_file(source.path)
    if not is_authors_checkpoint(raw):
        return TrainedCheckpoint(source, CheckpointPayload.from_dict(raw, source.path))
    released = source.released
    authors = convert_authors(raw, source.path, dataset=released.dataset if released else None)
    if released is not None and authors.backbone_name != released.backbone:
        logger.warning("%s: %s holds a %s backbone, not the %s it was released with: is it the right file?",
                       released.name, source.path, authors.backbone_name, released.backbone)
    logger.info("%s: an authors' checkpoint, converted in memory (backbone %s; `hpseg import-checkpoint` "
                "converts it once for all)", source.path, authors.backbone_name)
    return TrainedCheckpoint(source, authors.checkpoint, authors=authors)


def read_trained(source: str | Path) -> TrainedCheckpoint:
    """Read what ``source`` names once (see :mod:`hpseg.checkpoints.sources`): an hpseg checkpoint,
    an authors' one (converted in memory), a run folder's chosen checkpoint, a hub folder, an
    ``hf://`` name or a released model's name (its verified, downloaded file)."""
    resolved = resolve_source(source)
    if resolved.kind.is_hub:
        hub = read_hub_folder(resolved.path)
        return TrainedCheckpoint(resolved, hub.payload, hub=hub)
    return _read_file(resolved)


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


def _official_name(recorded: BackboneRecord, path: Path) -> str:
    """The registered name whose official weights ``recorded`` (a checkpoint's ``backbone``) was trained on."""
    name = recorded.name
    if name not in _EARLIER_OFFICIAL or recorded.official_recorded:
        return name
    earlier = _EARLIER_OFFICIAL[name]
    logger.warning("%s was trained on %s's official weights before hpseg switched that name to the paper's "
                   "300-epoch file: rebuilding the weights it was trained on, %r", path, name, earlier)
    return earlier


def resolve_backbone(checkpoint: TrainedCheckpoint, weights: str | Path | None = None) -> tuple[Backbone, str]:
    """The backbone ``checkpoint`` was trained on and where its weights came from (a file,
    ``"official"`` or ``"random"``); the order is the module docstring's."""
    recorded = checkpoint.payload.backbone
    name = recorded.name
    if weights:
        return create_backbone(name, weights=weights), str(weights)
    if checkpoint.authors is not None:
        return checkpoint.authors.backbone(), f"{checkpoint.path} (the authors' checkpoint's own tensors)"
    if recorded.weights:
        path = _stored_weights(checkpoint, recorded.weights)
        return create_backbone(name, weights=path), str(path)
    if recorded.pretrained:
        return create_backbone(_official_name(recorded, checkpoint.path), pretrained=True), "official"
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
        model.load_state_dict(checkpoint.payload.model)
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
    def payload(self) -> CheckpointPayload:
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

    def auto_mapping(self, crf: bool = False) -> tuple[list[int], str] | None:
        """The cluster -> class mapping that goes with this model, and where it came from: a hub
        folder's stored one, or an evaluation of this checkpoint recorded beside it (see
        :func:`hpseg.checkpoints.mapping.find_mapping`); None when there is none."""
        hub = self.checkpoint.hub
        if hub is not None:
            return None if hub.cluster_to_class is None else (hub.cluster_to_class, f"{self.checkpoint.label}/{CONFIG}")
        found = find_mapping(self.path, self.checkpoint.step, crf)
        if found is None:
            return None
        logger.info("using the cluster->class mapping of the evaluation in %s", found)
        return self.read_mapping(found), str(found)

    def read_mapping(self, path: str | Path) -> list[int]:
        """The cluster -> class list in ``path``, checked against this model's sizes and step."""
        return read_mapping(path, self.n_clusters, self.config.method.n_classes, self.checkpoint.step)


def load_trained(source: str | Path, device: str = "auto", weights: str | Path | None = None) -> TrainedModel:
    """Load the trained model ``source`` names (see :func:`read_trained`) for inference on
    ``device`` (``"auto"``: CUDA when available).

    ``weights``: a local backbone weights file, overriding the checkpoint's.
    """
    checkpoint = read_trained(source)
    torch_device = resolve_device(device)
    backbone, source = resolve_backbone(checkpoint, weights)
    model = _trained_heads(checkpoint, backbone)
    return TrainedModel(checkpoint, model.to(torch_device).eval(), backbone.to(torch_device), torch_device,
                        inference_dtype(checkpoint.config.train.amp, torch_device), source)
