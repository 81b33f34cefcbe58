"""``create_backbone``: build a registered backbone and give it weights.

Where the weights come from, in order:

1. ``weights=FILE``: a local checkpoint, loaded strictly (see :mod:`hpseg.backbones.weights`);
   ``pretrained`` is then ignored.
2. ``pretrained=True`` (default): the official weights from timm's Hugging Face Hub copy
   (``spec.hf_hub_id``), taken from the usual Hub cache or downloaded into it -- or, where the
   official file has no Hub copy (``spec.download_url``: ``dino_vits8``, DINO's 300-epoch file),
   from torch.hub's checkpoint cache or the authors' URL. Offline and not cached, or when the
   download fails, a ``BackboneWeightsError`` says which file to get and to pass it with
   ``--weights FILE``.
3. ``pretrained=False``: random initialisation (tests, benchmarks, demo without weights),
   always from seed ``RANDOM_INIT_SEED`` so that the same name gives the same network.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .registry import BackboneSpec, get_spec
from .vit import Backbone, build_timm_model
from .weights import load_weights_file, resolve_official_weights

RANDOM_INIT_SEED = 0


def create_backbone(
    name: str | BackboneSpec,
    weights: str | Path | None = None,
    pretrained: bool = True,
) -> Backbone:
    """Build the frozen backbone ``name`` (a registered name, or a spec for custom variants).

    Args:
        name: registered backbone name (see ``list_backbones()``) or a ``BackboneSpec``.
        weights: local checkpoint file; takes precedence over ``pretrained``.
        pretrained: without ``weights``, load the official weights (True) or keep the random
            initialisation (False).

    Raises:
        ValueError: unknown name.
        BackboneWeightsError: the weights cannot be obtained, read, or do not fit.
    """
    spec = name if isinstance(name, BackboneSpec) else get_spec(name)
    # Resolve the official file first: when it is unavailable we fail before spending
    # seconds on a random initialisation of a large model.
    path = Path(weights) if weights is not None else (resolve_official_weights(spec) if pretrained else None)
    # A random backbone is the same every time (seed 0, global RNG untouched): a run trained on
    # it and the evaluation or prediction that rebuilds it must see the same network.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = build_timm_model(spec)
    if path is not None:
        load_weights_file(model, spec, path)
    return Backbone(spec, model)
