"""The content of an hpseg checkpoint, typed: the one owner of the schema.

The trainer builds a :class:`CheckpointPayload` and saves :meth:`CheckpointPayload.to_dict`;
every reader gets one back from :meth:`CheckpointPayload.from_dict`, which checks each entry
and names the file and the key at fault. The on-disk form is a dict of tensors and plain
values (read with ``torch.load(weights_only=True)``); its entries are listed in
:class:`CheckpointPayload`'s docstring, which is built from the fields below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from hpseg.checkpoints.store import FORMAT, VERSION, CheckpointError, check_format, read_torch_file
from hpseg.config import Config

__all__ = ["CHECKPOINT_KINDS", "BackboneRecord", "CheckpointKind", "CheckpointPayload", "TrainingState", "load_checkpoint"]

#: What a checkpoint is: one of a run's selection rules (``checkpoints/<kind>.pt``, see
#: :mod:`hpseg.checkpoints.runs`) or the conversion of an authors' checkpoint.
CheckpointKind = Literal["last", "best", "unsupervised", "imported"]
CHECKPOINT_KINDS: tuple[str, ...] = get_args(CheckpointKind)


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


def _entry_dict(raw: dict[str, Any], key: str, path: Path, why: str) -> dict[str, Any]:
    """``raw[key]``, a dict; CheckpointError naming the file, the entry and ``why`` it is needed otherwise."""
    value = raw.get(key)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: incomplete hpseg checkpoint (no {key!r} entry: {why})")
    return value


@dataclass
class BackboneRecord:
    """Which backbone a checkpoint's heads were trained on."""

    name: str = field(metadata=_doc("registered backbone name"))
    weights: str | None = field(metadata=_doc("the local weights file trained with (None: official or random)"))
    pretrained: bool = field(metadata=_doc("False: the deterministic random initialisation"))
    official_weights: str | None = field(
        default=None, metadata=_doc("URL or Hub repository of the official file the name stood for"))
    #: False for a file written before ``official_weights`` was recorded (its name may have
    #: stood for an earlier official file; see :mod:`hpseg.checkpoints.trained`).
    official_recorded: bool = True

    def to_dict(self) -> dict[str, Any]:
        entry = {"name": self.name, "weights": self.weights, "pretrained": self.pretrained}
        return entry | ({"official_weights": self.official_weights} if self.official_recorded else {})

    @classmethod
    def from_dict(cls, raw: Any, config: Config, path: Path) -> BackboneRecord:
        """The ``backbone`` entry; missing values fall back to the run's config (older files)."""
        raw = raw if isinstance(raw, dict) else {}
        return cls(name=str(raw.get("name") or config.backbone.name), weights=raw.get("weights") or config.backbone.weights,
                   pretrained=bool(raw.get("pretrained", config.backbone.pretrained)),
                   official_weights=raw.get("official_weights"), official_recorded="official_weights" in raw)


@dataclass
class TrainingState:
    """What resuming a run needs beyond the model: optimisers, scaler, pools, scores, random states."""

    optimizers: dict[str, Any] = field(metadata=_doc("state dict of each optimiser, by name"))
    scaler: dict[str, Any] = field(metadata=_doc("the gradient scaler's state dict"))
    pool_agnostic: torch.Tensor | None = field(metadata=_doc("task-agnostic reference pool (N, C)"))
    pool_specific: torch.Tensor | None = field(metadata=_doc("task-specific reference pool (N, D)"))
    best_score: float = field(metadata=_doc("best sum of validation metrics so far"))
    best_step: int = field(metadata=_doc("its step"))
    total_steps: int = field(metadata=_doc("the run's planned number of steps"))
    rng: dict[str, torch.Tensor] = field(metadata=_doc("random states: torch, pool, contrast (and cuda)"))
    unsupervised_score: float = field(default=float("-inf"), metadata=_doc("best label-free score so far"))
    unsupervised_step: int = field(default=-1, metadata=_doc("its step"))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path) -> TrainingState:
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in raw]
        if missing:
            raise CheckpointError(f"{path}: incomplete training state (no {', '.join(map(repr, missing))} under "
                                  "'training'); the run cannot be resumed from it")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class CheckpointPayload:
    kind: CheckpointKind = field(metadata=_doc("what the checkpoint is"))
    step: int | None = field(metadata=_doc("the training step it was written at (None: imported)"))
    config: Config = field(metadata=_doc("the run's resolved config (a dict on disk)"))
    backbone: BackboneRecord = field(metadata=_doc("name, weights, pretrained, official_weights"))
    model: dict[str, torch.Tensor] = field(metadata=_doc("state dict of hpseg.method.HiddenPositivesModel"))
    class_names: list[str] | None = field(metadata=_doc("the dataset's class names (None: not recorded)"))
    selection: str = field(metadata=_doc("how the checkpoint was chosen, in words"))
    metrics: dict[str, Any] = field(default_factory=dict, metadata=_doc("validation metrics at that step (may be "
                                                                         "empty)"))
    selection_rule: str | None = field(default=None, metadata=_doc("the run's train.selection"))
    training: TrainingState | None = field(default=None, metadata=_doc("what resuming needs (None: imported)"))
    imported_from: str | None = field(default=None, metadata=_doc("the authors' file it was converted from"))

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form (``format`` and ``version`` first)."""
        entries: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            # Absent entries stay absent, as earlier versions wrote them; an imported file records step None.
            if value is not None or f.name == "step":
                entries[f.name] = value
        return entries

    @classmethod
    def from_dict(cls, raw: Any, path: str | Path) -> CheckpointPayload:
        """The payload of ``raw`` (the content of ``path``), each entry checked; CheckpointError
        naming the file and the entry otherwise."""
        path = Path(path)
        raw = check_format(raw, path)
        config_dict = _entry_dict(raw, "config", path, "the run's settings are needed to rebuild the model")
        try:
            config = Config.from_dict(config_dict)
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: the config inside it is invalid: {error}") from None
        model = _entry_dict(raw, "model", path, "the model weights")
        kind = raw.get("kind", "last")
        if kind not in CHECKPOINT_KINDS:
            raise CheckpointError(f"{path}: 'kind' is {kind!r}, expected one of {', '.join(CHECKPOINT_KINDS)}")
        step = raw.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise CheckpointError(f"{path}: 'step' is {step!r}, expected a step number")
        class_names = raw.get("class_names") or None
        if class_names is not None and (not isinstance(class_names, list)
                                        or not all(isinstance(n, str) for n in class_names)):
            raise CheckpointError(f"{path}: 'class_names' must be a list of strings")
        training = raw.get("training")
        return cls(
            kind=kind, step=step, config=config, backbone=BackboneRecord.from_dict(raw.get("backbone"), config, path),
            model=model, class_names=class_names, selection=str(raw.get("selection") or "unknown"),
            metrics=dict(raw.get("metrics") or {}), selection_rule=raw.get("selection_rule"),
            training=TrainingState.from_dict(training, path) if isinstance(training, dict) else None,
            imported_from=raw.get("imported_from"))


def _schema_text() -> str:
    """The fields of the payload and of its parts, one line each, from the dataclasses above."""

    def lines(cls: Any) -> list[str]:
        return [f"* ``{f.name}``: {f.metadata['doc']}" for f in dataclasses.fields(cls) if "doc" in f.metadata]

    kinds = " | ".join(f'"{k}"' for k in CHECKPOINT_KINDS)
    return "\n".join([
        "The content of an hpseg checkpoint file (a dict of tensors and plain values on disk, after",
        f"``format`` = {FORMAT!r} and ``version`` = {VERSION}). Entries (built from the fields):", "",
        *lines(CheckpointPayload), "",
        f"``kind`` is one of {kinds}. ``backbone``:", "", *lines(BackboneRecord), "",
        "``training``:", "", *lines(TrainingState),
    ])


CheckpointPayload.__doc__ = _schema_text()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> CheckpointPayload:
    """Read an hpseg checkpoint file (weights-only) into its typed payload."""
    return CheckpointPayload.from_dict(read_torch_file(path, map_location), path)
