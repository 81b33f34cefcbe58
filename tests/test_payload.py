"""The checkpoint schema's one owner (hpseg.checkpoints.payload): files in the layout earlier
hpseg versions wrote read back and are written again entry for entry; the docstring is built
from the fields; a broken entry is named with its file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from hpseg.checkpoints.payload import (
    CHECKPOINT_KINDS,
    BackboneRecord,
    CheckpointPayload,
    TrainingState,
    load_checkpoint,
)
from hpseg.checkpoints.store import CheckpointError, save_atomic
from hpseg.config import Config


def _trained_layout() -> dict[str, Any]:
    """A checkpoint as the trainer has written it since format version 1 (every entry)."""
    g = torch.Generator().manual_seed(0)
    return {
        "format": "hpseg-checkpoint", "version": 1, "kind": "best", "step": 12,
        "selection": "best sum of unsupervised and linear accuracy and mIoU on the validation set",
        "selection_rule": "best", "config": Config().to_dict(),
        "backbone": {"name": "dino_vits8", "weights": None, "pretrained": True,
                     "official_weights": "https://dl.fbaipublicfiles.com/dino/x.pth"},
        "class_names": ["a", "b"], "model": {"w": torch.randn(2, 3, generator=g)},
        "metrics": {"linear_miou": 0.5},
        "training": {"optimizers": {"head": {"state": {}, "param_groups": []}}, "scaler": {"scale": 2048.0},
                     "pool_agnostic": torch.randn(4, 3, generator=g), "pool_specific": torch.randn(4, 2, generator=g),
                     "best_score": 1.5, "best_step": 12, "unsupervised_score": float("-inf"),
                     "unsupervised_step": -1, "total_steps": 20, "rng": {"torch": torch.get_rng_state()}},
    }


def _imported_layout() -> dict[str, Any]:
    """A checkpoint as ``hpseg import-checkpoint`` has written it (no training state, no
    ``official_weights``)."""
    return {"format": "hpseg-checkpoint", "version": 1, "kind": "imported", "step": None,
            "selection": "imported from the authors' checkpoint hp.pth (their rule: best sum of validation metrics)",
            "config": Config().to_dict(), "backbone": {"name": "dino_vits8", "weights": "/w/hp.backbone.safetensors",
                                                       "pretrained": True},
            "class_names": ["a", "b"], "model": {"w": torch.zeros(1)}, "metrics": {}, "imported_from": "/w/hp.pth"}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("layout", [_trained_layout, _imported_layout])
def test_files_of_the_existing_layout_read_and_write_back_entry_for_entry(layout, tmp_path: Path) -> None:
    raw = layout()
    path = save_atomic(raw, tmp_path / "old.pt")
    payload = load_checkpoint(path)
    assert _same(payload.to_dict(), raw)
    assert payload.backbone.official_recorded == ("official_weights" in raw["backbone"])


def test_the_typed_payload_is_what_the_file_says() -> None:
    payload = CheckpointPayload.from_dict(_trained_layout(), "x.pt")
    assert isinstance(payload.config, Config) and isinstance(payload.backbone, BackboneRecord)
    assert isinstance(payload.training, TrainingState) and payload.training.total_steps == 20
    assert payload.kind == "best" and payload.step == 12 and payload.selection_rule == "best"
    assert CheckpointPayload.from_dict(_imported_layout(), "y.pt").training is None


def test_the_docstring_is_built_from_the_fields() -> None:
    doc = CheckpointPayload.__doc__ or ""
    for cls in (CheckpointPayload, BackboneRecord, TrainingState):
        for field in dataclasses.fields(cls):
            if "doc" in field.metadata:
                assert f"``{field.name}``: {field.metadata['doc']}" in doc
    assert " | ".join(f'"{kind}"' for kind in CHECKPOINT_KINDS) in doc
    assert set(CHECKPOINT_KINDS) == {"last", "best", "unsupervised", "imported"}


@pytest.mark.parametrize(("edit", "says"), [
    (lambda raw: raw.pop("config"), "no 'config' entry"),
    (lambda raw: raw.pop("model"), "no 'model' entry"),
    (lambda raw: raw.update(kind="newest"), "'kind' is 'newest', expected one of last, best, unsupervised, imported"),
    (lambda raw: raw.update(step="12"), "'step' is '12'"),
    (lambda raw: raw.update(version="1"), "'version' is '1', expected a format version number"),
    (lambda raw: raw.update(class_names="ab"), "'class_names' must be a list of strings"),
    (lambda raw: raw["training"].pop("total_steps"), "incomplete training state (no 'total_steps'"),
    (lambda raw: raw["config"]["method"].update(dim=0), "the config inside it is invalid: method.dim=0"),
])
def test_a_broken_entry_is_named_with_its_file(edit, says, tmp_path: Path) -> None:
    raw = _trained_layout()
    edit(raw)
    path = save_atomic(raw, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and says in str(error.value)
