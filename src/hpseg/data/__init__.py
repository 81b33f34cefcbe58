"""Data: raw datasets (COCO-Stuff-27, Cityscapes-27, Potsdam-3, a folder of images), robust image
reading, the offline preparation of the training set (five crops, or whole Potsdam tiles), the
PyTorch datasets of training items and validation views, transforms, and a synthetic dataset
generator.

Typical use::

    raw = build_raw_dataset("cocostuff27", "/data/cocostuff", "train")
    prepare_training_set(raw, "/data/cocostuff/hpseg_prepared/train_224", crop_size=224)
    train = TrainCrops("/data/cocostuff/hpseg_prepared/train_224")          # dicts: image, image_aug, label, index
    val = ValCrops(build_raw_dataset("cocostuff27", "/data/cocostuff", "val"), size=320)
"""

from .crops import TrainCrops, ValCrops
from .datasets import (
    CITYSCAPES27_CLASS_NAMES,
    DATASETS,
    POTSDAM3_CLASS_NAMES,
    Cityscapes27,
    CocoStuff27,
    FolderDataset,
    Potsdam3,
    RawDataset,
    RawSample,
    build_raw_dataset,
    dataset_class_names,
    load_cocostuff27_mapping,
)
from .errors import DatasetLayoutError, ImageReadError
from .images import array_to_rgb, read_image, read_label
from .prepare import (
    five_crop_boxes,
    five_crops,
    load_manifest,
    prepare_five_crops,
    prepare_training_set,
    recipe_mismatches,
    training_recipe,
)
from .synthetic import make_synthetic_dataset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotometricParams,
    draw_photometric_params,
    normalize,
    photometric_augment,
    photometric_view,
    val_view,
)

__all__ = [
    "CITYSCAPES27_CLASS_NAMES",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "POTSDAM3_CLASS_NAMES",
    "Cityscapes27",
    "PhotometricParams",
    "CocoStuff27",
    "DatasetLayoutError",
    "FolderDataset",
    "ImageReadError",
    "Potsdam3",
    "RawDataset",
    "RawSample",
    "TrainCrops",
    "ValCrops",
    "array_to_rgb",
    "build_raw_dataset",
    "dataset_class_names",
    "draw_photometric_params",
    "five_crop_boxes",
    "five_crops",
    "load_cocostuff27_mapping",
    "load_manifest",
    "make_synthetic_dataset",
    "normalize",
    "photometric_augment",
    "photometric_view",
    "prepare_five_crops",
    "prepare_training_set",
    "read_image",
    "read_label",
    "recipe_mismatches",
    "training_recipe",
    "val_view",
]
