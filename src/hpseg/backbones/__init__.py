"""Frozen self-supervised ViT backbones (DINO, DINOv2, DINOv3) behind one small interface.

>>> from hpseg.backbones import create_backbone
>>> bb = create_backbone("vit_tiny_p8", pretrained=False)
>>> out = bb(images, with_attention=True)   # images (B, 3, H, W), ImageNet-normalised
>>> out.features.shape                      # (B, C, H/p, W/p)
>>> out.attention_scores.shape              # (B, heads, prefix + h*w, prefix + h*w), before softmax

Modules: :mod:`.registry` (names and specs), :mod:`.vit` (the wrapper, attention-score
capture, DINO position interpolation), :mod:`.weights` (safe, strict weight loading; official
weights via the Hub cache or torch.hub's checkpoint cache),
:mod:`.factory` (``create_backbone``).
"""

from .factory import create_backbone
from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneSpec,
    format_backbone_table,
    get_spec,
    list_backbones,
)
from .vit import Backbone, BackboneOutput
from .weights import BackboneWeightsError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneOutput",
    "BackboneSpec",
    "BackboneWeightsError",
    "create_backbone",
    "format_backbone_table",
    "get_spec",
    "list_backbones",
]
