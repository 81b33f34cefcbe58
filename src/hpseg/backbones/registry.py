"""Registry of the frozen self-supervised ViT backbones hpseg knows by name.

Each entry is a :class:`BackboneSpec`: the timm architecture that builds it, its geometry
(patch size, width, heads, number of prefix tokens = class + register tokens) and where its
official weights come from. ``list_backbones`` / ``get_spec`` look entries up and
``format_backbone_table`` renders them for the ``hpseg backbones`` CLI command.

Official weights: every DINO (v1) name downloads DINO's own released file straight from DINO's
URL (``download_url``) into torch.hub's checkpoint cache -- the files the paper's numbers rest
on, not timm's converted Hub copies (timm's ``vit_small_patch8_224.dino`` is even another run
than the paper's ViT-S/8). DINOv2 and DINOv3 come through timm's Hugging Face Hub copies
(``hf_hub_id``). Any original file (``weights_url``) also loads when passed as a local file.

Which DINO file each name means (HP, like STEGO, uses the 300-epoch ViT-S/8 run):

====================  ==========================================
``dino_vits8``        ``dino_deitsmall8_300ep_pretrain.pth`` (the paper's)
``dino_vits8_800ep``  ``dino_deitsmall8_pretrain.pth``
``dino_vits16``       ``dino_deitsmall16_pretrain.pth``
``dino_vitb8``        ``dino_vitbase8_pretrain.pth``
``dino_vitb16``       ``dino_vitbase16_pretrain.pth``
====================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpseg.errors import InvalidInputError

#: Per-channel mean / std of the ImageNet normalisation every registered backbone expects.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of one backbone.

    Attributes:
        name: hpseg name, e.g. ``"dino_vits8"``.
        timm_name: model name passed to ``timm.create_model`` (with pretrained tag, if any).
        patch_size: side of a square patch in pixels; an H×W image gives (H/p)×(W/p) patches.
        embed_dim: token width C of the features (B, C, h, w).
        num_heads: attention heads of the last block.
        num_prefix_tokens: tokens before the patch tokens (1 class + registers); the
            attention matrix has T = num_prefix_tokens + h*w rows.
        weights_source: human-readable place to get the official weights ("" if none).
        description: one line for tables and error messages.
        depth: number of transformer blocks.
        family: ``"dino"``, ``"dinov2"``, ``"dinov3"`` or ``"random"`` (no official weights).
        hf_hub_id: Hub repository timm downloads the weights from ("" if none).
        weights_url: the authors' original checkpoint file, if they publish a direct link.
        download_url: official weights downloaded from this URL (not from the Hub) into
            torch.hub's checkpoint directory; "" to use ``hf_hub_id``.
        position_interpolation: how position embeddings reach a grid other than the native
            one: ``"dino"`` (DINO's ViT: bicubic, ``scale_factor = (grid + 0.1) / native``, no
            antialiasing), ``"timm"`` (timm's resize to the grid, antialiased bicubic = DINOv2
            with registers' own setting) or ``"rope"`` (DINOv3: RoPE for the grid, as timm).
        timm_kwargs: extra keyword arguments for ``timm.create_model`` as (key, value) pairs
            (a tuple, not a dict, so the frozen spec stays hashable).
    """

    name: str
    timm_name: str
    patch_size: int
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int
    weights_source: str
    description: str
    depth: int = 12
    family: str = "dino"
    hf_hub_id: str = ""
    weights_url: str = ""
    timm_kwargs: tuple[tuple[str, Any], ...] = ()
    download_url: str = ""
    position_interpolation: str = "dino"

    @property
    def has_official_weights(self) -> bool:
        return bool(self.hf_hub_id or self.download_url)

    @property
    def weights_file(self) -> str:
        """Name of the official file: the authors' for a direct download, else the Hub's."""
        return self.download_url.rsplit("/", 1)[-1] if self.download_url else "model.safetensors"

    @property
    def arch_label(self) -> str:
        """Short architecture label such as ``"ViT-S/8"`` (used in error messages)."""
        size = _SIZE_LETTER.get(self.embed_dim, f"{self.embed_dim}d")
        return f"ViT-{size}/{self.patch_size}"


_SIZE_LETTER = {64: "tiny64", 192: "Ti", 384: "S", 768: "B", 1024: "L"}

_HF = "https://huggingface.co/"
_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{0}/{0}_reg4_pretrain.pth"
_DINOV3_PAGE = "https://github.com/facebookresearch/dinov3 (weights after accepting the DINOv3 licence)"


def _dino(name: str, timm_name: str, patch: int, dim: int, heads: int, fb_name: str, desc: str) -> BackboneSpec:
    """A DINO backbone whose weights are DINO's own released file ``fb_name``.pth, downloaded from
    DINO's URL: timm's Hub copies are conversions (and for ViT-S/8 another run than the paper's)."""
    url = _DINO_URL.format(fb_name)
    return BackboneSpec(
        name=name, timm_name=timm_name, patch_size=patch, embed_dim=dim, num_heads=heads,
        num_prefix_tokens=1, weights_source=f"the official DINO file {url}",
        description=desc, family="dino", weights_url=url, download_url=url,
    )


def _dinov2(name: str, timm_name: str, dim: int, heads: int, fb_name: str, desc: str) -> BackboneSpec:
    hub = f"timm/{timm_name}"
    url = _DINOV2_URL.format(fb_name)
    return BackboneSpec(
        name=name, timm_name=timm_name, patch_size=14, embed_dim=dim, num_heads=heads,
        num_prefix_tokens=5, weights_source=f"{_HF}{hub} (or the official DINOv2 file {url})",
        description=desc, family="dinov2", hf_hub_id=hub, weights_url=url, position_interpolation="timm",
    )


def _dinov3(name: str, timm_name: str, dim: int, heads: int, desc: str) -> BackboneSpec:
    # The "_qkvb" timm variants keep the q/v biases of Meta's original checkpoints, so both
    # the timm Hub weights and Meta's original .pth files load without dropping parameters.
    hub = f"timm/{timm_name}"
    return BackboneSpec(
        name=name, timm_name=timm_name, patch_size=16, embed_dim=dim, num_heads=heads,
        num_prefix_tokens=5, weights_source=f"{_HF}{hub} (or Meta's original file: {_DINOV3_PAGE})",
        description=desc, family="dinov3", hf_hub_id=hub, position_interpolation="rope",
    )


_SPECS: tuple[BackboneSpec, ...] = (
    # DINO released two ViT-S/8 runs: the paper's is the 300-epoch one.
    _dino("dino_vits8", "vit_small_patch8_224.dino", 8, 384, 6, "dino_deitsmall8_300ep_pretrain",
          "DINO ViT-S/8, 300 epochs (HP default, the paper's weights)"),
    _dino("dino_vits8_800ep", "vit_small_patch8_224.dino", 8, 384, 6, "dino_deitsmall8_pretrain",
          "DINO ViT-S/8, 800 epochs (not the paper's)"),
    _dino("dino_vits16", "vit_small_patch16_224.dino", 16, 384, 6, "dino_deitsmall16_pretrain",
          "DINO ViT-S/16"),
    _dino("dino_vitb8", "vit_base_patch8_224.dino", 8, 768, 12, "dino_vitbase8_pretrain",
          "DINO ViT-B/8"),
    _dino("dino_vitb16", "vit_base_patch16_224.dino", 16, 768, 12, "dino_vitbase16_pretrain",
          "DINO ViT-B/16"),
    _dinov2("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2.lvd142m", 384, 6, "dinov2_vits14",
            "DINOv2 ViT-S/14 with 4 registers"),
    _dinov2("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2.lvd142m", 768, 12, "dinov2_vitb14",
            "DINOv2 ViT-B/14 with 4 registers"),
    _dinov3("dinov3_vits16", "vit_small_patch16_dinov3_qkvb.lvd1689m", 384, 6,
            "DINOv3 ViT-S/16 (RoPE, 4 registers)"),
    _dinov3("dinov3_vitb16", "vit_base_patch16_dinov3_qkvb.lvd1689m", 768, 12,
            "DINOv3 ViT-B/16 (RoPE, 4 registers)"),
    # A DINO-style architecture (class token with a position, no registers): DINO's
    # position interpolation, as the reference's ViT of the same shape (tests/data/backbone_a.npz).
    BackboneSpec(
        name="vit_tiny_p8", timm_name="vit_tiny_patch16_224", patch_size=8, embed_dim=64, num_heads=4,
        num_prefix_tokens=1, weights_source="", depth=2, family="random",
        description="tiny random ViT (2 blocks, width 64) for tests and the CPU demo; no official weights",
        timm_kwargs=(("patch_size", 8), ("embed_dim", 64), ("depth", 2), ("num_heads", 4), ("img_size", 32)),
    ),
)

_REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in _SPECS}


def list_backbones() -> list[BackboneSpec]:
    """All registered backbones, in registration order."""
    return list(_REGISTRY.values())


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under ``name``; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise InvalidInputError(f"unknown backbone {name!r}; known backbones: {known}") from None


def format_backbone_table() -> str:
    """Plain-text table of the registered backbones (for ``hpseg backbones``)."""
    header = ("name", "patch", "width", "heads", "prefix", "positions", "weights")
    rows = [
        (s.name, str(s.patch_size), str(s.embed_dim), str(s.num_heads), str(s.num_prefix_tokens),
         s.position_interpolation, s.weights_source or "none (random init only)")
        for s in _REGISTRY.values()
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]

    def line(row: tuple[str, ...]) -> str:
        # The weights column is last and left ragged: URLs are long.
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]

    sep = "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1])
    notes = ("prefix = class + register tokens before the patch tokens; "
             "inputs are ImageNet-normalised, H and W multiples of the patch size.\n"
             "positions = how position embeddings reach a grid other than the native one:\n"
             "  dino: as DINO's ViT (bicubic, scale_factor (grid + 0.1) / native grid, no antialiasing);\n"
             "  timm: resized to the grid with antialiased bicubic, DINOv2-with-registers' own setting\n"
             "        (its hub code: interpolate_offset 0, interpolate_antialias True);\n"
             "  rope: DINOv3's rotary embeddings computed for the grid, as timm does.\n"
             "LHP uses the last block's attention scores before the softmax (q.k^T/sqrt(d)), as the reference.")
    return "\n".join([line(header), sep, *(line(r) for r in rows), "", notes])
