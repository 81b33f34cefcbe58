"""PyTorch datasets of the training crops and of the validation view.

* :class:`TrainCrops` reads a directory written by :func:`~hpseg.data.prepare_training_set`
  and yields the normalised training item (stored crops larger than the crop size are resized,
  nearest, shorter side to it, and centre-cropped, as the authors' loader does), its
  photometric view (consistency loss, spec §5) and its label.
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
from .prepare import IGNORE_U8, image_suffix, load_manifest
from .transforms import (
    ImageInterpolation,
    PhotometricInput,
    label_view,
    normalize,
    photometric_pair,
    pil_to_uint8_tensor,
    val_view,
)

__all__ = ["TrainCrops", "ValCrops"]


class TrainCrops(Dataset):
    """Training set prepared offline (five crops or whole images, see ``hpseg.data.prepare``).

    ``TrainCrops(prepared_dir, with_augmented=True, photometric_input="normalized")``; attributes
    ``n_classes``, ``class_names``, ``crop_size`` (S), ``has_labels``, ``manifest``, ``crops`` (stems).

    ``ds[i]`` -> dict:
      image:     (3, S, S) float32, ImageNet-normalised
      image_aug: (3, S, S) float32 photometric view (only with ``with_augmented``): of the
                 normalised image, not normalised again **[ref quirk]**, or with
                 ``photometric_input="uint8"`` of the 0..255 image, then normalised
      label:     (S, S) int64 class ids, −1 = ignore (all −1 when the dataset has no labels)
      index:     i
    The augmentation draws from torch's global RNG (seeded per DataLoader worker by torch).
    """

    def __init__(self, prepared_dir: str | Path, with_augmented: bool = True,
                 photometric_input: PhotometricInput = "normalized") -> None:
        if photometric_input not in ("normalized", "uint8"):
            raise ValueError(f"photometric_input must be 'normalized' or 'uint8', got {photometric_input!r}")
        self.root = Path(prepared_dir)
        # Raises DatasetLayoutError ("run `hpseg prepare`") if missing or incomplete.
        self.manifest: dict[str, Any] = load_manifest(self.root)
        self.with_augmented = with_augmented
        self.photometric_input: PhotometricInput = photometric_input
        self.suffix = image_suffix(self.manifest)
        self.crops: list[str] = list(self.manifest["crops"])
        self.n_classes: int = int(self.manifest["n_classes"])
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.crop_size: int = int(self.manifest["crop_size"])
        self.has_labels: bool = bool(self.manifest["has_labels"])

    def __len__(self) -> int:
        return len(self.crops)

    def image_path(self, i: int) -> Path:
        return self.root / "images" / f"{self.crops[i]}{self.suffix}"

    def _stored_label(self, i: int) -> np.ndarray:
        return read_label(self.root / "labels" / f"{self.crops[i]}.png")

    @staticmethod
    def _classes(stored: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.where(stored == IGNORE_U8, -1, stored).astype(np.int64))

    def label(self, i: int) -> torch.Tensor:
        """(S, S) int64 class ids of item ``i``, −1 = ignore (all −1 when the dataset has no labels)."""
        s = self.crop_size
        if not self.has_labels:
            return torch.full((s, s), -1, dtype=torch.int64)
        return self._classes(label_view(self._stored_label(i), s))

    def view(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, S, S) uint8 image and (S, S) int64 label of item ``i`` after the training geometry."""
        image = read_image(self.image_path(i))
        stored = self._stored_label(i) if self.has_labels else None
        if stored is not None and stored.shape != (image.height, image.width):
            raise InvalidInputError(f"{self.image_path(i)} and its label differ in size; re-prepare {self.root}")
        image, stored = val_view(image, stored, self.crop_size)  # a no-op on items already at S
        s = self.crop_size
        label = torch.full((s, s), -1, dtype=torch.int64) if stored is None else self._classes(stored)
        return pil_to_uint8_tensor(image), label

    def __getitem__(self, i: int) -> dict[str, Any]:
        rgb, label = self.view(i)
        out: dict[str, Any] = {}
        if self.with_augmented:
            out["image"], out["image_aug"] = photometric_pair(rgb, self.photometric_input)
        else:
            out["image"] = normalize(rgb)
        out["label"] = label
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
            raise InvalidInputError(
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
