"""Every class of a dataset has its own name: a legend showing two classes under one name (the
demo's two "stripes" classes, COCO-Stuff's thing and stuff "food") cannot be read."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpseg.data import make_synthetic_dataset
from hpseg.data.datasets import CITYSCAPES27_CLASS_NAMES, POTSDAM3_CLASS_NAMES, load_cocostuff27_mapping


def _descriptions(names: list[str]) -> list[str]:
    """What a synthetic name says besides its number: ``class 5 (magenta stripes)`` -> ``magenta stripes``."""
    return [name.split("(", 1)[1].rstrip(")") for name in names]


def test_cocostuff27_thing_and_stuff_classes_are_told_apart() -> None:
    _, names = load_cocostuff27_mapping()
    assert len(names) == 27 and len(set(names)) == 27
    # Coarse ids 0..11 are things, 12..26 stuff (the benchmark's order).
    assert names[2] == "food (thing)" and names[14] == "food (stuff)"
    assert names[3] == "furniture (thing)" and names[15] == "furniture (stuff)"


def test_shipped_class_lists_are_distinct() -> None:
    for names in (CITYSCAPES27_CLASS_NAMES, POTSDAM3_CLASS_NAMES):
        assert len(set(names)) == len(names)


@pytest.mark.parametrize("n_classes", [4, 6, 10])
def test_synthetic_classes_differ_beyond_their_number(tmp_path: Path, n_classes: int) -> None:
    """From the sixth class on textures repeat; the colour word keeps the descriptions apart."""
    root = make_synthetic_dataset(tmp_path, n_train=0, n_val=0, size=8, n_classes=n_classes)
    names = (root / "classes.txt").read_text().splitlines()
    assert len(names) == n_classes
    assert len(set(_descriptions(names))) == n_classes, names
    if n_classes == 6:  # the demo's classes, as its legend shows them (hues k/6 of the wheel from red)
        assert names[0] == "class 0 (red stripes)" and names[5] == "class 5 (magenta stripes)"
