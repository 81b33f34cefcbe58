"""The frozen ViT wrapper: patch features and last-block attention from a timm model.

:class:`Backbone` wraps a timm ``VisionTransformer`` (DINO, DINOv2) or ``Eva`` (DINOv3, with
RoPE) and returns a :class:`BackboneOutput`:

* ``features`` (B, C, h, w): last-block tokens after the final norm, prefix (class +
  register) tokens dropped — HP's task-agnostic features;
* ``attention`` (B, heads, T, T), T = num_prefix_tokens + h*w, prefix tokens first (class
  token at 0): the last block's softmax probabilities, only when asked for.

Without attention the model runs timm's fused ``scaled_dot_product_attention`` path. With
attention, the last block alone is switched to timm's explicit path for that one call and a
forward hook on its ``attn_drop`` (identity in eval mode) records the probabilities. Both timm
attention classes used here compute ``softmax(q kᵀ · scale)`` right before ``attn_drop``, and
``Eva`` applies RoPE to q and k *before* that point, so the same hook is correct for DINOv3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .registry import BackboneSpec


@dataclass
class BackboneOutput:
    """What a backbone forward pass returns.

    Attributes:
        features: (B, C, h, w) float32 patch features (last block, after the final norm,
            prefix tokens dropped), h = H / patch_size, w = W / patch_size.
        attention: (B, heads, T, T) float32 last-block attention probabilities, rows sum to 1,
            T = num_prefix_tokens + h*w with the prefix tokens first (class token at index 0)
            and patch tokens in row-major order; ``None`` unless ``with_attention=True``.
    """

    features: Tensor
    attention: Tensor | None = None


class Backbone(nn.Module):
    """A frozen self-supervised ViT: always in eval mode, no parameter requires grad.

    Attributes:
        spec: the :class:`BackboneSpec` it was built from.
        model: the wrapped timm model.
        patch_size, embed_dim, num_heads, num_prefix_tokens: geometry, read from the model.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.model = model
        self.patch_size = _patch_size(model)
        self.embed_dim = int(model.embed_dim)
        last_attn = _last_attention(model)
        self.num_heads = int(last_attn.num_heads)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        geometry = (self.patch_size, self.embed_dim, self.num_heads, self.num_prefix_tokens)
        declared = (spec.patch_size, spec.embed_dim, spec.num_heads, spec.num_prefix_tokens)
        if geometry != declared:
            raise ValueError(
                f"backbone {spec.name!r}: timm model has (patch, width, heads, prefix) = {geometry}, "
                f"spec declares {declared}"
            )
        model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Ignore ``mode``: a frozen backbone stays in eval mode (no dropout, no drop-path),
        even when a parent module calls ``.train()``."""
        return super().train(False)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) patch grid of an image of ``height`` × ``width`` pixels (ValueError if not multiples)."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"backbone {self.spec.name!r} needs image height and width that are multiples of its "
                f"patch size {p}, got {height}x{width} (crop or resize to e.g. "
                f"{max(p, height // p * p)}x{max(p, width // p * p)})"
            )
        return height // p, width // p

    @torch.no_grad()
    def forward(self, images: Tensor, with_attention: bool = False) -> BackboneOutput:
        """Features (and optionally attention) of ImageNet-normalised ``images``.

        Args:
            images: (B, 3, H, W), normalised with IMAGENET_MEAN / IMAGENET_STD; H and W must be
                multiples of ``patch_size`` (any such size works: position embeddings are
                interpolated, RoPE is computed for the grid).
            with_attention: also return the last block's attention (slower: explicit path).

        Returns:
            BackboneOutput with features (B, C, H/p, W/p) and attention (B, heads, T, T) or None.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = self.grid_size(images.shape[-2], images.shape[-1])
        if with_attention:
            tokens, attention = self._forward_with_attention(images)
        else:
            tokens, attention = self.model.forward_features(images), None

        n_tokens = self.num_prefix_tokens + h * w
        if tokens.shape[1] != n_tokens:
            raise RuntimeError(f"expected {n_tokens} tokens from {self.spec.name!r}, got {tokens.shape[1]}")
        patches = tokens[:, self.num_prefix_tokens:]  # (B, h*w, C), row-major patch order
        features = patches.transpose(1, 2).reshape(images.shape[0], self.embed_dim, h, w).float()
        return BackboneOutput(features=features, attention=attention)

    def _forward_with_attention(self, images: Tensor) -> tuple[Tensor, Tensor]:
        attn = _last_attention(self.model)
        captured: list[Tensor] = []

        def record(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            captured.append(output)

        handle = attn.attn_drop.register_forward_hook(record)
        fused_before = attn.fused_attn
        attn.fused_attn = False
        try:
            tokens = self.model.forward_features(images)
        finally:
            # Restore even on error, so no later call sees the slow path or a stale hook.
            attn.fused_attn = fused_before
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"expected one attention map from the last block of {self.spec.name!r}, got {len(captured)}"
            )
        # Under autocast the probabilities may be fp16 / bf16; callers get float32.
        return tokens, captured[0].float()

    def extra_repr(self) -> str:
        return (f"name={self.spec.name}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
                f"num_heads={self.num_heads}, num_prefix_tokens={self.num_prefix_tokens}")


def build_timm_model(spec: BackboneSpec) -> nn.Module:
    """The randomly initialised timm architecture of ``spec`` (no classifier, any input size)."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True, **dict(spec.timm_kwargs)}
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    _last_attention(model)  # fail at build time, not at the first forward, if unsupported
    return model


def _last_attention(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
        raise TypeError(
            f"{type(model).__name__} is not a supported ViT: need blocks[-1].attn with "
            "`fused_attn` and `attn_drop` (timm VisionTransformer / Eva)"
        )
    return attn


def _patch_size(model: nn.Module) -> int:
    size = model.patch_embed.patch_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise ValueError(f"only square patches are supported, got {size}")
    return int(size[0])
