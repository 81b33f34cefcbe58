"""The frozen ViT wrapper: patch features and last-block attention scores from a timm model.

:class:`Backbone` wraps a timm ``VisionTransformer`` (DINO, DINOv2) or ``Eva`` (DINOv3, with
RoPE) and returns a :class:`BackboneOutput`:

* ``features`` (B, C, h, w): last-block tokens after the final norm, prefix (class +
  register) tokens dropped — HP's task-agnostic features;
* ``attention_scores`` (B, heads, T, T), T = num_prefix_tokens + h*w, prefix tokens first
  (class token at 0): the last block's attention scores *before* the softmax, q·kᵀ·scale —
  what the reference's ``get_intermediate_feat`` hands its LHP code (spec §1, §4) — only when
  asked for. ``attention_probabilities()`` gives their softmax.

**How the scores are captured.** Every timm attention class used here (``Attention``,
``EvaAttention``) hands its final q and k — after the q/k norms and, for Eva, after RoPE as
timm applies it — to ``F.scaled_dot_product_attention`` on its fused path. While the last
block's attention runs, a ``TorchFunctionMode`` sees that call, records ``q kᵀ · scale`` (in
float32, the scale SDPA itself uses) and lets the call proceed unchanged, so the features are
those of the plain fused forward. This needs no copy of timm's attention code and no log of
probabilities (which would lose the row offsets and underflow); a timm that stopped calling
SDPA would give no capture and an error, not wrong numbers.

**Position embeddings** at a grid other than the native one follow each family's own code
(``spec.position_interpolation``): ``"dino"`` = DINO's ViT (bicubic with
``scale_factor = (grid + 0.1) / native``, no antialiasing; see :func:`dino_position_embedding`),
``"timm"`` = timm's resampling to the target size with antialiased bicubic, which *is*
DINOv2-with-registers' own setting (``interpolate_offset=0``, ``interpolate_antialias=True``
in its hub code), ``"rope"`` = DINOv3's RoPE computed for the grid, as timm does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from hpseg.errors import InvalidInputError

from .registry import BackboneSpec


@dataclass
class BackboneOutput:
    """What a backbone forward pass returns.

    Attributes:
        features: (B, C, h, w) float32 patch features (last block, after the final norm,
            prefix tokens dropped), h = H / patch_size, w = W / patch_size.
        attention_scores: (B, heads, T, T) float32 last-block attention scores before the
            softmax (q·kᵀ·scale), T = num_prefix_tokens + h*w with the prefix tokens first
            (class token at index 0) and patch tokens in row-major order; ``None`` unless
            ``with_attention=True``.
    """

    features: Tensor
    attention_scores: Tensor | None = None

    def attention_probabilities(self) -> Tensor:
        """(B, heads, T, T) softmax of the scores: the attention weights, rows sum to 1."""
        if self.attention_scores is None:
            raise ValueError("no attention was captured: call the backbone with with_attention=True")
        return self.attention_scores.softmax(-1)


class _ScoresCapture(TorchFunctionMode):
    """Records q·kᵀ·scale of each ``scaled_dot_product_attention`` call made while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.scores: list[Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.active and func is F.scaled_dot_product_attention:
            self.scores.append(_sdpa_scores(*args, **kwargs))
        return func(*args, **kwargs)


def _sdpa_scores(query: Tensor, key: Tensor, *_: Any, attn_mask: Tensor | None = None, is_causal: bool = False,
                 scale: float | None = None, **__: Any) -> Tensor:
    """(B, heads, T, d) q and k -> (B, heads, T, T) float32 (q kᵀ) · scale, SDPA's default scale 1/√d."""
    if attn_mask is not None or is_causal:
        raise RuntimeError("the backbone's last attention uses a mask: its scores are not q·kᵀ·scale alone")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    # float32 even under autocast (which would run the product in half precision); the
    # reference's order: product first, then the scale (its `(q @ k.T) * scale`).
    with torch.autocast(query.device.type, enabled=False):
        return (query.float() @ key.float().transpose(-2, -1)) * scale


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
            raise InvalidInputError(
                f"backbone {self.spec.name!r} needs image height and width that are multiples of its "
                f"patch size {p}, got {height}x{width} (crop or resize to e.g. "
                f"{max(p, height // p * p)}x{max(p, width // p * p)})"
            )
        return height // p, width // p

    @torch.no_grad()
    def forward(self, images: Tensor, with_attention: bool = False) -> BackboneOutput:
        """Features (and optionally attention scores) of ImageNet-normalised ``images``.

        Args:
            images: (B, 3, H, W), normalised with IMAGENET_MEAN / IMAGENET_STD; H and W must be
                multiples of ``patch_size`` (any such size works: position embeddings are
                interpolated as the family's own code does, RoPE is computed for the grid).
            with_attention: also return the last block's pre-softmax attention scores.

        Returns:
            BackboneOutput with features (B, C, H/p, W/p) and attention_scores (B, heads, T, T)
            or None.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = self.grid_size(images.shape[-2], images.shape[-1])
        if with_attention:
            tokens, scores = self._forward_with_scores(images)
        else:
            tokens, scores = self.model.forward_features(images), None

        n_tokens = self.num_prefix_tokens + h * w
        if tokens.shape[1] != n_tokens:
            raise RuntimeError(f"expected {n_tokens} tokens from {self.spec.name!r}, got {tokens.shape[1]}")
        patches = tokens[:, self.num_prefix_tokens:]  # (B, h*w, C), row-major patch order
        features = patches.transpose(1, 2).reshape(images.shape[0], self.embed_dim, h, w).float()
        return BackboneOutput(features=features, attention_scores=scores)

    def _forward_with_scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        attn = _last_attention(self.model)
        capture = _ScoresCapture()

        def start(*_: Any) -> None:
            capture.active = True

        def stop(*_: Any) -> None:
            capture.active = False

        handles = [attn.register_forward_pre_hook(start), attn.register_forward_hook(stop)]
        fused_before = attn.fused_attn
        attn.fused_attn = True  # the capture sees the SDPA call of the fused path only
        try:
            with capture:
                tokens = self.model.forward_features(images)
        finally:
            # Restore even on error, so no later call sees a stale setting or hook.
            attn.fused_attn = fused_before
            for handle in handles:
                handle.remove()
        if len(capture.scores) != 1:
            raise RuntimeError(
                f"expected one attention call in the last block of {self.spec.name!r}, got {len(capture.scores)}"
            )
        return tokens, capture.scores[0]

    def extra_repr(self) -> str:
        return (f"name={self.spec.name}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
                f"num_heads={self.num_heads}, num_prefix_tokens={self.num_prefix_tokens}")


def build_timm_model(spec: BackboneSpec) -> nn.Module:
    """The randomly initialised timm architecture of ``spec`` (no classifier, any input size)."""
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True, **dict(spec.timm_kwargs)}
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    _last_attention(model)  # fail at build time, not at the first forward, if unsupported
    if spec.position_interpolation == "dino":
        _use_dino_position_embedding(model)
    return model


def dino_position_embedding(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """DINO's ``interpolate_pos_encoding``: (1, 1 + N, C) class + native-grid embeddings ->
    (1, 1 + h*w, C) for an (h, w) patch grid.

    Bicubic, ``align_corners=False``, no antialiasing, and the grid given by ``scale_factor =
    (grid + 0.1) / sqrt(N)`` rather than by an output size (facebookresearch/dino issue 8):
    PyTorch then samples with that very scale, so the result differs from resizing to (h, w).
    DINO's code unpacks the image as ``B, nc, w, h`` — its ``w`` is the height — and passes
    ``(w0 / sqrt(N), h0 / sqrt(N))`` for the (rows, columns) of the grid: for a non-square
    image the rows are scaled by the *height's* factor and the columns by the width's, i.e.
    the result is oriented correctly despite the names; we write it with honest names. The
    native square grid is returned untouched, as DINO does.
    """
    n = pos_embed.shape[1] - 1
    native = math.sqrt(n)
    h, w = grid
    if h * w == n and h == w:
        return pos_embed
    side = int(native)
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((h + 0.1) / native, (w + 0.1) / native), mode="bicubic")
    if patch.shape[-2:] != (h, w):
        raise RuntimeError(f"DINO position interpolation gave a {tuple(patch.shape[-2:])} grid, expected {(h, w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


def _use_dino_position_embedding(model: nn.Module) -> None:
    """Make timm's ViT add position embeddings as DINO's ViT does, at every grid."""
    ok = (getattr(model, "cls_token", None) is not None and getattr(model, "reg_token", None) is None
          and not getattr(model, "no_embed_class", True) and getattr(model, "pos_embed", None) is not None
          and getattr(model, "dynamic_img_size", False))
    if not ok:
        raise TypeError(f"{type(model).__name__} is not a DINO-style ViT (class token with a position, no registers)")
    # An instance attribute shadows timm's `_pos_embed`, the one place forward_features adds
    # positions; the state dict is untouched.
    model._pos_embed = partial(_dino_pos_embed, model)


def _dino_pos_embed(model: nn.Module, x: Tensor) -> Tensor:
    """(B, h, w, C) patch embeddings (timm's NHWC with dynamic_img_size) -> (B, 1 + h*w, C)
    tokens: class token first, then DINO's position embeddings added (DINO's prepare_tokens)."""
    batch, h, w, dim = x.shape
    tokens = torch.cat([model.cls_token.expand(batch, -1, -1), x.reshape(batch, h * w, dim)], dim=1)
    return model.pos_drop(tokens + dino_position_embedding(model.pos_embed, (h, w)))


def _last_attention(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not hasattr(attn, "fused_attn"):
        raise TypeError(
            f"{type(model).__name__} is not a supported ViT: need blocks[-1].attn with "
            "`fused_attn` (timm VisionTransformer / Eva)"
        )
    return attn


def _patch_size(model: nn.Module) -> int:
    size = model.patch_embed.patch_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise ValueError(f"only square patches are supported, got {size}")
    return int(size[0])
