"""PyTorch datasets of the training crops and of the validation view.

* :class:`TrainCrops` reads a directory written by :func:`~hpseg.data.prepare_five_crops`
  and yields the normalised crop, its photometrically augmented twin (consistency loss,
  spec §5) and its label.
* :class:`ValCrops` wraps a :class:`~hpseg.data.RawDataset` and yields the validation view of
  spec §7 (shorter side resized to ``size``, centre ``size × size`` crop), plus the uint8 RGB
  crop for the CRF and figures.

Both return dicts of tensors that the default collate function batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hpseg.errors import InvalidInputError

from .datasets import RawDataset
from .images import read_image, read_label
from .prepare import IGNORE_U8, load_manifest
from .transforms import ImageInterpolation, normalize, photometric_augment, pil_to_uint8_tensor, val_view

__all__ = ["TrainCrops", "ValCrops"]


class TrainCrops(Dataset):
    """Five-crop training set prepared offline.

    ``TrainCrops(prepared_dir, with_augmented=True)``; attributes ``n_classes``,
    ``class_names``, ``crop_size`` (S), ``has_labels``, ``manifest``, ``crops`` (stems).

    ``ds[i]`` -> dict:
      image:     (3, S, S) float32, ImageNet-normalised
      image_aug: (3, S, S) float32, normalised photometric view (only with ``with_augmented``)
      label:     (S, S) int64 class ids, −1 = ignore (all −1 when the dataset has no labels)
      index:     i
    The augmentation draws from torch's global RNG (seeded per DataLoader worker by torch).
    """

    def __init__(self, prepared_dir: str | Path, with_augmented: bool = True) -> None:
        self.root = Path(prepared_dir)
        # Raises DatasetLayoutError ("run `hpseg prepare`") if missing or incomplete.
        self.manifest: dict[str, Any] = load_manifest(self.root)
        self.with_augmented = with_augmented
        self.crops: list[str] = list(self.manifest["crops"])
        self.n_classes: int = int(self.manifest["n_classes"])
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.crop_size: int = int(self.manifest["crop_size"])
        self.has_labels: bool = bool(self.manifest["has_labels"])

    def __len__(self) -> int:
        return len(self.crops)

    def image_path(self, i: int) -> Path:
        return self.root / "images" / f"{self.crops[i]}.png"

    def label(self, i: int) -> torch.Tensor:
        """(S, S) int64 class ids of crop ``i``, −1 = ignore (all −1 when the dataset has no labels)."""
        s = self.crop_size
        if not self.has_labels:
            return torch.full((s, s), -1, dtype=torch.int64)
        stored = read_label(self.root / "labels" / f"{self.crops[i]}.png")
        return torch.from_numpy(np.where(stored == IGNORE_U8, -1, stored).astype(np.int64))

    def __getitem__(self, i: int) -> dict[str, Any]:
        stem = self.crops[i]
        rgb = pil_to_uint8_tensor(read_image(self.root / "images" / f"{stem}.png"))
        s = self.crop_size
        if tuple(rgb.shape[1:]) != (s, s):
            raise InvalidInputError(
                f"crop {self.image_path(i)} is {tuple(rgb.shape[1:])}, expected {(s, s)}; re-prepare"
            )
        out: dict[str, Any] = {"image": normalize(rgb)}
        if self.with_augmented:
            out["image_aug"] = normalize(photometric_augment(rgb))
        out["label"] = self.label(i)
        out["index"] = i
        return out


class ValCrops(Dataset):
    """Validation view of a raw dataset.

    ``ValCrops(raw, size=320, image_interpolation="nearest")``; attributes ``n_classes``,
    ``class_names``, ``size`` (S), ``raw``.

    ``ds[i]`` -> dict:
      image: (3, S, S) float32, ImageNet-normalised
      rgb:   (3, S, S) uint8 (for the CRF and figures)
      label: (S, S) int64 class ids, −1 = ignore (all −1 when the dataset has no labels)
      index: i
    The image is resized nearest-neighbour by default **[ref quirk]**; "bilinear" is the
    cleaner option. Labels are always resized nearest-neighbour.
    """

    def __init__(
        self, raw: RawDataset, size: int = 320, image_interpolation: ImageInterpolation = "nearest"
    ) -> None:
        if image_interpolation not in ("nearest", "bilinear"):
            raise ValueError(
                f"image_interpolation must be 'nearest' or 'bilinear', got {image_interpolation!r}"
            )
        self.raw = raw
        self.size = int(size)
        self.image_interpolation = image_interpolation
        self.n_classes = raw.n_classes
        self.class_names = raw.class_names

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.raw[i]
        img, lab = val_view(sample.image, sample.label, self.size, self.image_interpolation)
        rgb = pil_to_uint8_tensor(img)
        if lab is None:
            label = torch.full((self.size, self.size), -1, dtype=torch.int64)
        else:
            label = torch.from_numpy(lab)
        return {"image": normalize(rgb), "rgb": rgb, "label": label, "index": i}
