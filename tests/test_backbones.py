"""Tests of hpseg.backbones: geometry, attention-score capture, position interpolation,
eval/no-grad, weight files, offline errors.

Everything runs on tiny random ViTs (2 blocks, width 64, patch 8, 32x32 inputs) except one
test that builds the registered ViT-S architectures (random weights, tiny inputs) to check
the register-token layouts. No network: official-weight tests run in offline mode against
an empty or fake Hugging Face cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hpseg.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneOutput,
    BackboneSpec,
    BackboneWeightsError,
    create_backbone,
    format_backbone_table,
    get_spec,
    list_backbones,
)
from hpseg.backbones.vit import build_timm_model
from tests.helpers import dino_reference_positions

REGISTERED = {
    # name: (patch, width, heads, prefix tokens, depth)
    "dino_vits8": (8, 384, 6, 1, 12),
    "dino_vits8_800ep": (8, 384, 6, 1, 12),
    "dino_vits16": (16, 384, 6, 1, 12),
    "dino_vitb8": (8, 768, 12, 1, 12),
    "dino_vitb16": (16, 768, 12, 1, 12),
    "dinov2_vits14_reg": (14, 384, 6, 5, 12),
    "dinov2_vitb14_reg": (14, 768, 12, 5, 12),
    "dinov3_vits16": (16, 384, 6, 5, 12),
    "dinov3_vitb16": (16, 768, 12, 5, 12),
    "vit_tiny_p8": (8, 64, 4, 1, 2),
}

_TINY_KW = (("patch_size", 8), ("embed_dim", 64), ("depth", 2), ("num_heads", 4))


def _tiny_variant(name: str, extra: tuple = ()) -> BackboneSpec:
    """A 2-block, width-64, patch-8 version of a registered architecture, without official weights."""
    return dataclasses.replace(
        get_spec(name), name=f"tiny_{name}", patch_size=8, embed_dim=64, num_heads=4, depth=2,
        hf_hub_id="", timm_kwargs=_TINY_KW + extra,
    )


TINY_DINOV2 = _tiny_variant("dinov2_vits14_reg", (("img_size", 32),))
TINY_DINOV3 = _tiny_variant("dinov3_vits16")


def _sharpen(backbone: Backbone, seed: int = 0) -> Backbone:
    """Give the last block large random q/k/v weights (and biases, where the layout has them):
    a freshly initialised ViT attends almost uniformly, which would make attention checks weak."""
    g = torch.Generator().manual_seed(seed)
    attn = backbone.model.blocks[-1].attn
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.randn(attn.qkv.weight.shape, generator=g) * 0.5)
        for name in ("q_bias", "v_bias"):
            bias = getattr(attn, name, None)
            if isinstance(bias, torch.nn.Parameter):
                bias.copy_(torch.randn(bias.shape, generator=g))
    return backbone


def _images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    torch.manual_seed(0)
    return _sharpen(create_backbone("vit_tiny_p8", pretrained=False))


@pytest.fixture(scope="module")
def tiny_v3() -> Backbone:
    torch.manual_seed(1)
    return _sharpen(create_backbone(TINY_DINOV3, pretrained=False))


@pytest.fixture(scope="module")
def tiny_v2() -> Backbone:
    torch.manual_seed(2)
    return _sharpen(create_backbone(TINY_DINOV2, pretrained=False))


# --------------------------------------------------------------------------------------
# Registry


def test_registry_lists_every_backbone_with_its_geometry() -> None:
    specs = {s.name: s for s in list_backbones()}
    assert set(specs) == set(REGISTERED)
    for name, (patch, width, heads, prefix, depth) in REGISTERED.items():
        s = get_spec(name)
        assert (s.patch_size, s.embed_dim, s.num_heads, s.num_prefix_tokens, s.depth) == (
            patch, width, heads, prefix, depth)
    table = format_backbone_table()
    for name in REGISTERED:
        assert name in table
    assert "huggingface.co/timm/vit_small_patch14_reg4_dinov2.lvd142m" in table
    assert "dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth" in table
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="dino_vits8"):
        get_spec("dino_vit_huge")
    with pytest.raises(ValueError, match="known backbones"):
        create_backbone("nope", pretrained=False)


#: Registered ViT-S architectures worth running for real (random weights, tiny inputs): one
#: per token layout — class token only, class + 4 registers, class + 4 registers with RoPE.
RUN_FOR_REAL = ("dino_vits8", "dinov2_vits14_reg", "dinov3_vits16")


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_architecture_matches_spec(name: str) -> None:
    """Every registered timm architecture exists and has the declared geometry. Those not run
    for real are built with a single block (a ViT-B initialises in seconds; its geometry does
    not depend on the depth), so the ViT-B entries are checked too."""
    import timm

    spec = get_spec(name)
    if name in RUN_FOR_REAL or name == "vit_tiny_p8":
        model = build_timm_model(spec)
        assert len(model.blocks) == spec.depth
    else:
        model = build_timm_model(dataclasses.replace(spec, timm_kwargs=(("depth", 1),)))
    bb = Backbone(spec, model)  # raises if patch / width / heads / prefix differ from the spec
    assert bb.patch_size == spec.patch_size
    if spec.hf_hub_id:
        assert spec.timm_name in timm.list_models(pretrained=True)
        assert timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id == spec.hf_hub_id
    if name in RUN_FOR_REAL:
        p, c, heads, prefix, _ = REGISTERED[name]
        out = bb(_images(1, 2 * p, 3 * p), with_attention=True)
        assert out.features.shape == (1, c, 2, 3)
        assert out.attention_scores.shape == (1, heads, prefix + 6, prefix + 6)  # registers count in T
        torch.testing.assert_close(out.attention_probabilities().sum(-1), torch.ones(1, heads, prefix + 6))


# --------------------------------------------------------------------------------------
# Forward: shapes, attention, state


def test_shapes_and_attention_rows(tiny: Backbone) -> None:
    out = tiny(_images(), with_attention=True)
    assert isinstance(out, BackboneOutput)
    assert out.features.shape == (2, 64, 4, 4) and out.features.dtype == torch.float32
    scores = out.attention_scores
    assert scores.shape == (2, 4, 17, 17) and scores.dtype == torch.float32
    assert scores.min() < 0, "scores before the softmax, not probabilities"
    probs = out.attention_probabilities()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 17))
    assert probs.max() > 0.2, "sharpened attention should not be uniform (1/17)"
    assert tiny(_images()).attention_scores is None


def test_features_are_final_norm_patch_tokens(tiny: Backbone) -> None:
    x = _images()
    tokens = tiny.model.forward_features(x)  # (B, 1 + 16, 64), already after the final norm
    expected = tokens[:, 1:].reshape(2, 4, 4, 64).permute(0, 3, 1, 2)
    torch.testing.assert_close(tiny(x).features, expected, rtol=0, atol=0)


def _v_and_output_of_last_attention(bb: Backbone, x: torch.Tensor, with_attention: bool):
    """Run ``bb`` and return (output, (q, k, v) before the q/k norms and RoPE, output of the last
    attention module, the RoPE tensor it was given or None)."""
    attn = bb.model.blocks[-1].attn
    seen = {}

    def record_input(_m, args, kwargs):
        seen["x"], seen["rope"] = args[0], kwargs.get("rope")

    pre = attn.register_forward_pre_hook(record_input, with_kwargs=True)
    post = attn.register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out))
    try:
        out = bb(x, with_attention=with_attention)
    finally:
        pre.remove()
        post.remove()
    tokens = seen["x"]
    B, T, _ = tokens.shape
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is not None:  # Eva keeps the qkv bias outside the Linear
        qkv = F.linear(tokens, attn.qkv.weight, torch.cat((q_bias, attn.k_bias, attn.v_bias)))
    else:
        qkv = attn.qkv(tokens)
    q, k, v = qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return out, (q, k, v), seen["out"], seen["rope"]


def _rotate(x: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    """RoPE written out: rope = [sin | cos] along the last dim; pairs are the two halves of the
    head (``half``) or interleaved neighbours."""
    sin, cos = rope.tensor_split(2, -1)
    if half:
        a, b = x.chunk(2, -1)
        turned = torch.cat([-b, a], -1)
    else:
        turned = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + turned * sin


def _independent_scores(bb: Backbone, q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """q·kᵀ/√d of the last block from its q and k, q/k norms and RoPE applied here."""
    attn = bb.model.blocks[-1].attn
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        n, half = bb.num_prefix_tokens, bool(getattr(attn, "rotate_half", False))
        q = torch.cat([q[:, :, :n], _rotate(q[:, :, n:], rope, half)], 2)
        k = torch.cat([k[:, :, :n], _rotate(k[:, :, n:], rope, half)], 2)
    return (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5


@pytest.mark.parametrize("which", ["tiny", "tiny_v2", "tiny_v3"])
def test_attention_is_what_the_fused_path_computes(which: str, request: pytest.FixtureRequest) -> None:
    """The returned probabilities reproduce the last attention module's fused output
    (proj(attn @ v)), so they are the ones the model uses — also for DINOv3 with RoPE."""
    bb = request.getfixturevalue(which)
    x = _images(2, 32, 24)
    fused, _, fused_attn_out, _ = _v_and_output_of_last_attention(bb, x, with_attention=False)
    explicit, (_, _, v), _, _ = _v_and_output_of_last_attention(bb, x, with_attention=True)
    A = explicit.attention_probabilities()
    B, _, T, _ = A.shape
    assert T == bb.num_prefix_tokens + 4 * 3
    attn = bb.model.blocks[-1].attn
    rebuilt = attn.proj(attn.norm((A @ v).transpose(1, 2).reshape(B, T, -1)))
    torch.testing.assert_close(rebuilt, fused_attn_out, rtol=1e-4, atol=1e-5)
    # Capturing the scores does not change the features.
    torch.testing.assert_close(explicit.features, fused.features, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["tiny", "tiny_v2", "tiny_v3"])
def test_scores_are_q_k_scale_before_the_softmax(which: str, request: pytest.FixtureRequest) -> None:
    """The scores themselves (not only their softmax, which forgives a per-row offset) equal an
    independent q·kᵀ/√d: DINO-style ViT, DINOv2 with registers, DINOv3/Eva with RoPE."""
    bb = request.getfixturevalue(which)
    out, (q, k, _), _, rope = _v_and_output_of_last_attention(bb, _images(2, 32, 24), with_attention=True)
    assert (rope is not None) == (which == "tiny_v3")
    expected = _independent_scores(bb, q, k, rope)
    torch.testing.assert_close(out.attention_scores, expected, rtol=1e-5, atol=1e-5)
    # Not the log of the probabilities: rows keep their own offsets.
    assert (out.attention_scores.logsumexp(-1) - 0).abs().max() > 1e-2


def test_attention_capture_leaves_no_state(tiny: Backbone) -> None:
    attn = tiny.model.blocks[-1].attn
    fused_before = attn.fused_attn

    def clean() -> bool:
        return (attn.fused_attn == fused_before and not attn._forward_hooks and not attn._forward_pre_hooks
                and not torch._C._is_torch_function_mode_enabled())

    tiny(_images(), with_attention=True)
    assert clean()

    def boom(*_args):
        raise RuntimeError("boom")

    handle = tiny.model.norm.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            tiny(_images(), with_attention=True)
    finally:
        handle.remove()
    assert clean()
    assert tiny(_images()).attention_scores is None


def test_attention_under_autocast_is_float32(tiny: Backbone) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(_images(), with_attention=True)
    assert out.attention_scores.dtype == torch.float32 and out.features.dtype == torch.float32
    exact = tiny(_images(), with_attention=True).attention_scores
    torch.testing.assert_close(out.attention_scores, exact, rtol=0, atol=5e-2 * exact.abs().max().item())


def test_any_multiple_of_the_patch_works(tiny: Backbone) -> None:
    out = tiny(_images(1, 40, 32), with_attention=True)
    assert out.features.shape == (1, 64, 5, 4)
    assert out.attention_scores.shape == (1, 4, 21, 21)
    with pytest.raises(ValueError, match="multiples of its patch size 8"):
        tiny(_images(1, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny(torch.zeros(3, 32, 32))


def test_always_eval_and_frozen(tiny: Backbone) -> None:
    parent = torch.nn.Sequential(tiny)
    assert parent.train() is parent and tiny.train() is tiny
    assert not any(m.training for m in tiny.modules())
    assert all(not p.requires_grad for p in tiny.parameters())
    x = _images().requires_grad_(True)
    out = tiny(x, with_attention=True)
    assert not out.features.requires_grad and not out.attention_scores.requires_grad
    # Dropout-free and deterministic despite .train():
    torch.testing.assert_close(tiny(x).features, tiny(x).features, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Position embeddings at other grids


def _manual_tokens_forward(bb: Backbone, images: torch.Tensor, tokens_with_positions) -> torch.Tensor:
    """Patch embedding -> ``tokens_with_positions(patches (B, h*w, C), h, w)`` -> blocks -> final
    norm, prefix dropped: (B, C, h, w)."""
    m = bb.model
    patches = m.patch_embed.proj(images)
    b, c, h, w = patches.shape
    x = tokens_with_positions(patches.flatten(2).transpose(1, 2), h, w)
    for block in m.blocks:
        x = block(x)
    return m.norm(x)[:, bb.num_prefix_tokens:].transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (40, 24), (24, 56)])
def test_dino_position_interpolation_at_any_size(tiny: Backbone, size: tuple[int, int]) -> None:
    """Square and non-square grids: features equal a forward with DINO's own interpolation, and
    differ from timm's antialiased resize (the old behaviour) away from the native grid."""
    from timm.layers import resample_abs_pos_embed

    x = _images(2, *size)
    m = tiny.model
    pos = dino_reference_positions(m.pos_embed, x, 8)

    def dino(patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return torch.cat([m.cls_token.expand(len(patches), -1, -1), patches], 1) + pos

    torch.testing.assert_close(tiny(x).features, _manual_tokens_forward(tiny, x, dino), rtol=1e-5, atol=1e-5)
    if size != (32, 32):
        timm_pos = resample_abs_pos_embed(m.pos_embed, (size[0] // 8, size[1] // 8), num_prefix_tokens=1)
        assert (timm_pos - pos).abs().max() > 1e-3


def test_dinov2_interpolation_is_dinov2s_own(tiny_v2: Backbone) -> None:
    """DINOv2 with registers at a non-native, non-square grid, against DINOv2's hub setting
    written here: bicubic to the target size, antialiased, in float32 (interpolate_offset 0,
    interpolate_antialias True); registers carry no position and sit after the class token."""
    m = tiny_v2.model
    x = _images(2, 40, 24)
    native = int(m.pos_embed.shape[1] ** 0.5)

    def dinov2(patches: torch.Tensor, h: int, w: int) -> torch.Tensor:
        grid = m.pos_embed.float().reshape(1, native, native, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
        patches = patches + grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        b = len(patches)
        return torch.cat([m.cls_token.expand(b, -1, -1), m.reg_token.expand(b, -1, -1), patches], 1)

    assert (5, 3) != (native, native)
    torch.testing.assert_close(tiny_v2(x).features, _manual_tokens_forward(tiny_v2, x, dinov2),
                               rtol=1e-5, atol=1e-5)


def test_each_family_states_its_position_interpolation() -> None:
    expected = {"dino": "dino", "random": "dino", "dinov2": "timm", "dinov3": "rope"}
    for spec in list_backbones():
        assert spec.position_interpolation == expected[spec.family], spec.name
    table = format_backbone_table()
    assert "positions" in table and "(grid + 0.1)" in table and "antialias" in table


# --------------------------------------------------------------------------------------
# Weight files


def _dino_teacher_checkpoint(bb: Backbone) -> dict:
    """The DINO training-checkpoint layout: networks wrapped as module.backbone.* plus a head."""
    teacher = {f"module.backbone.{k}": v.clone() for k, v in bb.model.state_dict().items()}
    teacher["module.head.last_layer.weight_g"] = torch.ones(1, 1)
    return {"teacher": teacher}


def test_load_dino_teacher_checkpoint_exactly(tiny: Backbone, tmp_path: Path) -> None:
    path = tmp_path / "dino_tiny.pth"
    torch.save(_dino_teacher_checkpoint(tiny), path)
    loaded = create_backbone("vit_tiny_p8", weights=path)
    x = _images()
    a, b = tiny(x, with_attention=True), loaded(x, with_attention=True)
    assert torch.equal(a.features, b.features) and torch.equal(a.attention_scores, b.attention_scores)


def test_load_full_dino_training_checkpoint_takes_the_teacher(tiny: Backbone, tmp_path: Path) -> None:
    ckpt = _dino_teacher_checkpoint(tiny)
    student = {k: torch.zeros_like(v) for k, v in ckpt["teacher"].items()}
    ckpt.update(student=student, optimizer={"state": {}, "param_groups": []}, epoch=3,
                args=argparse.Namespace(arch="vit_small", patch_size=8), dino_loss={"center": torch.zeros(1, 8)})
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    loaded = create_backbone("vit_tiny_p8", weights=str(path))
    assert torch.equal(loaded(_images()).features, tiny(_images()).features)


def test_load_safetensors(tiny: Backbone, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = create_backbone("vit_tiny_p8", weights=path)
    assert torch.equal(loaded(_images()).features, tiny(_images()).features)


def test_load_original_dinov2_layout(tiny_v2: Backbone, tmp_path: Path) -> None:
    """Meta's DINOv2 files: register_tokens, a mask token, and a position for the class token."""
    sd = dict(tiny_v2.model.state_dict())
    pos_cls = torch.randn(1, 1, 64)
    original = {k: v for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    original.update(
        cls_token=sd["cls_token"] - pos_cls, register_tokens=sd["reg_token"],
        pos_embed=torch.cat([pos_cls, sd["pos_embed"]], dim=1), mask_token=torch.zeros(1, 64),
    )
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(original, path)
    loaded = create_backbone(TINY_DINOV2, weights=path)
    torch.testing.assert_close(loaded(_images()).features, tiny_v2(_images()).features)


def test_load_original_dinov3_layout(tiny_v3: Backbone, tmp_path: Path) -> None:
    """Meta's DINOv3 files: storage_tokens, ls1/ls2.gamma, a fused qkv.bias, rope periods."""
    original = {}
    for k, v in tiny_v3.model.state_dict().items():
        if k.endswith("attn.v_bias"):
            continue
        if k.endswith("attn.q_bias"):
            blk = k[: -len("q_bias")]
            original[blk + "qkv.bias"] = torch.cat([v, torch.zeros_like(v), tiny_v3.model.state_dict()[blk + "v_bias"]])
            original[blk + "qkv.bias_mask"] = torch.ones(3 * v.numel())
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        original[k] = v
    original.update(mask_token=torch.zeros(1, 64), **{"rope_embed.periods": torch.ones(4)})
    path = tmp_path / "dinov3_tiny_pretrain.pth"
    torch.save(original, path)
    loaded = create_backbone(TINY_DINOV3, weights=path)
    assert torch.equal(loaded(_images()).features, tiny_v3(_images()).features)


def test_dinov3_weights_without_qv_bias_load_as_zero_bias(tmp_path: Path) -> None:
    torch.manual_seed(3)
    bb = create_backbone(TINY_DINOV3, pretrained=False)
    sd = {k: v for k, v in bb.model.state_dict().items() if not k.endswith(("q_bias", "v_bias"))}
    path = tmp_path / "nobias.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = create_backbone(TINY_DINOV3, weights=path)
    assert torch.equal(loaded(_images()).features, bb(_images()).features)


# --------------------------------------------------------------------------------------
# Bad weight files


def _raises_naming(path: Path, *fragments: str) -> BackboneWeightsError:
    with pytest.raises(BackboneWeightsError) as info:
        create_backbone("vit_tiny_p8", weights=path)
    msg = str(info.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return info.value


def test_text_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    _raises_naming(path, "not a PyTorch or safetensors checkpoint")


def test_truncated_checkpoint_is_rejected(tiny: Backbone, tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    torch.save(tiny.model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _raises_naming(path, "damaged")


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    _raises_naming(tmp_path / "nowhere.pth", "does not exist")


def test_wrong_width_is_rejected(tmp_path: Path) -> None:
    wide = _tiny_variant("dino_vits8")
    wide = dataclasses.replace(wide, embed_dim=32, timm_kwargs=(("patch_size", 8), ("embed_dim", 32),
                                                               ("depth", 3), ("num_heads", 4)))
    path = tmp_path / "wide.pth"
    torch.save(build_timm_model(wide).state_dict(), path)
    err = _raises_naming(path, "vit_tiny_p8", "shape mismatch", "cls_token", "width 32", "3 blocks",
                         "unexpected key")
    assert err.__cause__ is None


def test_wrong_patch_size_is_not_silently_resampled(tmp_path: Path) -> None:
    p16 = dataclasses.replace(get_spec("vit_tiny_p8"), timm_kwargs=_TINY_KW[1:] + (("patch_size", 16),))
    path = tmp_path / "p16.pth"
    torch.save(build_timm_model(p16).state_dict(), path)
    _raises_naming(path, "patch_embed.proj.weight", "(64, 3, 16, 16)", "patch 16")


class _Payload:
    """Stands for an arbitrary object in a malicious or foreign pickle."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran() -> None:
    _Payload.ran = True


def test_arbitrary_pickle_is_not_unpickled(tmp_path: Path) -> None:
    torch_file = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, torch_file)
    _raises_naming(torch_file, "other than tensors", "_mark_ran")
    plain_file = tmp_path / "evil.pkl"
    plain_file.write_bytes(pickle.dumps(_Payload(), protocol=2))
    _raises_naming(plain_file, "other than tensors")
    assert not _Payload.ran


def test_non_state_dict_content_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    _raises_naming(path, "not a state dict")
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    _raises_naming(path, "does not contain a state dict")


# --------------------------------------------------------------------------------------
# Official weights: offline / download failure


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_offline_error_is_actionable_and_fast(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(BackboneWeightsError) as info:
        create_backbone("dinov2_vits14_reg")
    # No network attempt: the unpatched hub client would first hang for about 47 s.
    assert time.perf_counter() - start < 10
    msg = str(info.value)
    for fragment in ("dinov2_vits14_reg", "--weights FILE", "weights=FILE", "model.safetensors",
                     "https://huggingface.co/timm/vit_small_patch14_reg4_dinov2.lvd142m",
                     "dinov2_vits14_reg4_pretrain.pth"):
        assert fragment in msg, msg
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_download_failure_is_actionable(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*_args, **_kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(BackboneWeightsError, match="--weights FILE") as info:
        create_backbone("dinov3_vits16")
    assert "dinov3_vits16" in str(info.value) and "ConnectionError" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_offline_uses_the_hub_cache(tiny: Backbone, empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = dataclasses.replace(get_spec("vit_tiny_p8"), hf_hub_id="timm/hpseg-test-tiny")
    repo = empty_hub_cache / "models--timm--hpseg-test-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    loaded = create_backbone(spec)
    assert torch.equal(loaded(_images()).features, tiny(_images()).features)


#: Each DINO name and the authors' file it stands for (HP's ViT-S/8 is the 300-epoch run).
DINO_FILES = {
    "dino_vits8": "dino_deitsmall8_300ep_pretrain.pth",
    "dino_vits8_800ep": "dino_deitsmall8_pretrain.pth",
    "dino_vits16": "dino_deitsmall16_pretrain.pth",
    "dino_vitb8": "dino_vitbase8_pretrain.pth",
    "dino_vitb16": "dino_vitbase16_pretrain.pth",
}


def test_each_dino_name_is_pinned_to_its_file() -> None:
    dino = {s.name for s in list_backbones() if s.family == "dino"}
    assert dino == set(DINO_FILES)
    for name, filename in DINO_FILES.items():
        spec = get_spec(name)
        assert spec.weights_url == f"https://dl.fbaipublicfiles.com/dino/{filename[:-4]}/{filename}"
        assert filename in spec.weights_source
        # DINO's own released file from DINO's URL, never timm's converted Hub copy.
        assert spec.download_url == spec.weights_url and not spec.hf_hub_id, name
        assert spec.weights_file == filename


@pytest.fixture
def empty_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch.hub's directory in tmp_path (its checkpoints/ is where direct downloads go)."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return Path(torch.hub.get_dir())


def test_paper_vits8_offline_error_names_the_url(empty_torch_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneWeightsError) as info:
        create_backbone("dino_vits8")
    msg = str(info.value)
    for fragment in ("dino_vits8", "--weights FILE", "dino_deitsmall8_300ep_pretrain.pth",
                     "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/"
                     "dino_deitsmall8_300ep_pretrain.pth", str(empty_torch_hub / "checkpoints")):
        assert fragment in msg, msg
    assert info.value.__cause__ is None


def _url_spec() -> BackboneSpec:
    return dataclasses.replace(get_spec("vit_tiny_p8"), download_url="https://example.invalid/dino/tiny_300ep.pth")


def test_direct_download_weights_come_from_torch_hub_cache(tiny: Backbone, empty_torch_hub: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache laid out by the test: the DINO-format file in torch.hub's checkpoints/, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (empty_torch_hub / "checkpoints").mkdir(parents=True)
    torch.save(_dino_teacher_checkpoint(tiny), empty_torch_hub / "checkpoints" / "tiny_300ep.pth")
    loaded = create_backbone(_url_spec())
    assert torch.equal(loaded(_images()).features, tiny(_images()).features)


def test_direct_download_goes_to_torch_hub_cache(tiny: Backbone, empty_torch_hub: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake_download(url: str, dst: str, *args, **kwargs) -> None:  # stands for the network
        calls.append((url, dst))
        torch.save(_dino_teacher_checkpoint(tiny), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    loaded = create_backbone(_url_spec())
    assert calls == [("https://example.invalid/dino/tiny_300ep.pth",
                      str(empty_torch_hub / "checkpoints" / "tiny_300ep.pth"))]
    assert torch.equal(loaded(_images()).features, tiny(_images()).features)
    create_backbone(_url_spec())  # now cached: no second download
    assert len(calls) == 1

    def no_network(*_args, **_kwargs) -> None:
        raise ConnectionError("Name or service not known")

    (empty_torch_hub / "checkpoints" / "tiny_300ep.pth").unlink()
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(BackboneWeightsError, match="--weights FILE") as info:
        create_backbone(_url_spec())
    assert "https://example.invalid/dino/tiny_300ep.pth" in str(info.value) and "ConnectionError" in str(info.value)


def test_no_official_weights_for_the_tiny_model() -> None:
    with pytest.raises(BackboneWeightsError, match="pretrained=False"):
        create_backbone("vit_tiny_p8")


def test_random_backbone_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = create_backbone("vit_tiny_p8", pretrained=False)
    assert torch.equal(torch.rand(1), expected_next)
    second = create_backbone("vit_tiny_p8", pretrained=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
