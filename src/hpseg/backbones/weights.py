"""Loading backbone weights safely and strictly, and locating the official ones.

Two jobs:

* :func:`load_weights_file` reads a local checkpoint — the authors' DINO ``.pth`` (a plain
  state dict, or one nested under ``teacher`` / ``student`` / ``model`` / ``state_dict``,
  keys prefixed ``module.`` / ``backbone.``, DINO-head keys ``head.*`` ignored), Meta's
  original DINOv2 / DINOv3 files, or timm ``.pth`` / ``.bin`` / ``.safetensors`` files — and
  loads it into a timm model. Files are read with ``torch.load(weights_only=True)`` or
  safetensors, never by unpickling arbitrary objects. Key names are mapped with timm's
  checkpoint filter for the architecture; any missing / unexpected key or shape mismatch
  raises :class:`BackboneWeightsError` naming the file, the backbone and offending keys.
* :func:`resolve_official_weights` finds the official weights file in the Hugging Face Hub
  cache, downloading it if needed (the same repositories and cache timm's ``pretrained=True``
  uses) -- or, for a backbone whose official file has no Hub copy (``spec.download_url``, e.g.
  DINO's 300-epoch ViT-S/8), in torch.hub's checkpoint directory
  (``torch.hub.get_dir()/checkpoints``, where ``torch.hub.load`` of DINO puts it too),
  downloading it there from the authors' URL. Offline or on any download failure it raises
  :class:`BackboneWeightsError` telling the user which file to fetch and to pass it with
  ``--weights FILE``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpseg.errors import HpsegError

from .registry import BackboneSpec

log = logging.getLogger(__name__)

#: Keys under which training checkpoints nest the backbone's state dict, in order of
#: preference: DINO's training checkpoints hold both networks and the teacher is the one
#: the DINO authors (and HP) evaluate.
_NESTING_KEYS = ("teacher", "state_dict", "model", "module", "model_ema", "student")
#: Wrapper prefixes stripped from keys (DataParallel, DINO's MultiCropWrapper, torch.compile).
_KEY_PREFIXES = ("module.", "backbone.", "_orig_mod.")
#: The Hub files timm's pretrained mechanism looks for, safest first.
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


def strip_key_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    """``key`` without any of ``prefixes`` in front, repeatedly ("module.backbone.x" -> "x"): the
    wrappers that training code adds (DataParallel, torch.compile, a backbone attribute)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


class BackboneWeightsError(HpsegError, RuntimeError):
    """Backbone weights could not be obtained or do not fit the backbone."""


# --------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file into a dict without executing arbitrary pickled code.

    safetensors files are recognised by content (not by suffix). PyTorch files are read with
    ``weights_only=True``; ``argparse.Namespace`` is allowed in addition because DINO's full
    training checkpoints store their command-line arguments that way.
    """
    path = Path(path)
    if not path.exists():
        raise BackboneWeightsError(f"weights file {str(path)!r} does not exist")
    if not path.is_file():
        raise BackboneWeightsError(f"weights file {str(path)!r} is not a regular file")
    with path.open("rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # noqa: BLE001 -- SafetensorError, OSError, ...: all "unreadable"
            raise BackboneWeightsError(
                f"weights file {str(path)!r} is not a readable safetensors file ({short_error(exc)})"
            ) from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        # Neither a zip archive (torch.save) nor a pickle (legacy torch.save): a text file, an
        # image, an HTML error page saved by a failed download, ...
        raise BackboneWeightsError(
            f"weights file {str(path)!r} is not a PyTorch or safetensors checkpoint (it starts with {head!r})"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise BackboneWeightsError(
                f"weights file {str(path)!r} contains pickled Python objects other than tensors "
                f"({unsupported_global(exc)}); it is not loaded because unpickling them could run "
                "arbitrary code. Save the backbone's state_dict() (or a safetensors file) instead."
            ) from None
        raise BackboneWeightsError(
            f"weights file {str(path)!r} is not a PyTorch checkpoint ({short_error(exc)})"
        ) from None
    except Exception as exc:  # noqa: BLE001
        # Unpickling garbage can fail with almost any exception type (IndexError, EOFError,
        # RuntimeError for a truncated zip archive, ...): all mean "not a usable checkpoint".
        raise BackboneWeightsError(
            f"weights file {str(path)!r} is not a readable PyTorch checkpoint, or is damaged "
            f"({type(exc).__name__}: {short_error(exc)})"
        ) from None
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(
            f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict"
        )
    return dict(obj)


def _looks_like_safetensors(head: bytes) -> bool:
    # A safetensors file starts with an 8-byte little-endian header length, then a JSON object.
    return len(head) >= 9 and head[8:9] == b"{"


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unsupported_global(exc: BaseException) -> str:
    # torch's weights_only message is long; keep the line naming the refused class.
    # "Unsupported global: GLOBAL x.y ..." or, for a blocked module, "unsupported GLOBAL x.y whose module ...".
    match = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
    return f"found {match.group(1)}" if match else short_error(exc)


# --------------------------------------------------------------------------------------
# From a checkpoint dict to the backbone's state dict


def extract_backbone_state_dict(checkpoint: Mapping[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """Unnest, strip wrapper prefixes and drop the DINO head: ``{key: tensor}`` for the ViT alone."""
    sd: Mapping[str, Any] = checkpoint
    # Unnest while the dict is a container rather than a flat state dict.
    while not _is_flat_state_dict(sd):
        nested = next((k for k in _NESTING_KEYS if isinstance(sd.get(k), Mapping)), None)
        if nested is None:
            keys = ", ".join(map(str, list(sd)[:8]))
            raise BackboneWeightsError(
                f"weights file {str(path)!r} does not contain a state dict of tensors "
                f"(top-level keys: {keys}; expected tensors, or a dict under one of {', '.join(_NESTING_KEYS)})"
            )
        sd = sd[nested]

    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = strip_key_prefixes(str(key), _KEY_PREFIXES)
        if key.startswith("head."):
            continue  # DINO projection head / classifier: not part of the backbone
        out[key] = value
    if not out:
        raise BackboneWeightsError(f"weights file {str(path)!r} contains no backbone tensors")
    return out


def _is_flat_state_dict(d: Mapping[str, Any]) -> bool:
    return len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


# --------------------------------------------------------------------------------------
# Strict loading


def load_weights_file(model: nn.Module, spec: BackboneSpec, path: str | Path) -> None:
    """Load ``path`` into the timm ``model`` of ``spec``; raise ``BackboneWeightsError`` on any mismatch."""
    sd = extract_backbone_state_dict(read_checkpoint(path), path)
    expected = model.state_dict()

    # timm's filters silently resample a patch embedding or position embedding of another
    # size; that would turn e.g. ViT-S/16 weights into a broken ViT-S/8. Such tensors are
    # reported, and kept away from the filter.
    resample_prone = _resample_prone_mismatches(sd, expected)
    kept = {k: v for k, v in sd.items() if k not in resample_prone}
    try:
        mapped = _zero_fill_qv_bias(_timm_filter(model)(kept, model), expected)
    except Exception as exc:  # noqa: BLE001 -- timm's filters assume well-formed checkpoints
        if not resample_prone:
            raise BackboneWeightsError(
                f"weights file {str(path)!r}: cannot map its keys to backbone {spec.name!r} "
                f"({type(exc).__name__}: {short_error(exc)})"
            ) from None
        mapped = kept  # the file is wrong anyway; describe it under its own key names

    missing = [k for k in expected if k not in mapped and k not in resample_prone]
    unexpected = [k for k in mapped if k not in expected]
    shapes = list(resample_prone.values()) + [
        f"{k}: file {tuple(mapped[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items() if k in mapped and mapped[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise BackboneWeightsError(_mismatch_message(path, spec, sd, shapes, missing, unexpected))
    model.load_state_dict(mapped, strict=True)
    log.info("loaded %s weights from %s", spec.name, path)


def _timm_filter(model: nn.Module) -> Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]:
    """The ``checkpoint_filter_fn`` of the timm module defining ``model``'s class (maps original
    DINOv2 / DINOv3 key names to timm's); identity if there is none."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) else (lambda sd, _model: sd)


def _resample_prone_mismatches(
    sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, str]:
    """``{key: description}`` for patch / position embeddings whose shape does not fit."""
    out = {}
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in sd or key not in expected or sd[key].shape == expected[key].shape:
            continue
        file_shape, exp_shape = tuple(sd[key].shape), tuple(expected[key].shape)
        # Meta's DINOv2-with-registers files carry one extra (class token) position that
        # timm's filter folds into cls_token; that is the only legitimate difference.
        if key == "pos_embed" and "register_tokens" in sd and len(exp_shape) == 3 \
                and file_shape == (exp_shape[0], exp_shape[1] + 1, exp_shape[2]):
            continue
        out[key] = f"{key}: file {file_shape} vs expected {exp_shape}"
    return out


def _zero_fill_qv_bias(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv3 weights saved from timm's bias-free variant lack q/v biases; the bias-free model
    *is* the model with zero biases, so zeros reproduce it exactly."""
    bias_keys = [k for k in expected if k.endswith(("attn.q_bias", "attn.v_bias"))]
    if bias_keys and not any(k in sd for k in bias_keys):
        sd = dict(sd)
        for k in bias_keys:
            sd[k] = torch.zeros_like(expected[k], device="cpu")
    return sd


def _mismatch_message(
    path: str | Path,
    spec: BackboneSpec,
    sd: Mapping[str, torch.Tensor],
    shapes: list[str],
    missing: list[str],
    unexpected: list[str],
    show: int = 4,
) -> str:
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:show]))
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. " + ", ".join(missing[:show]))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. " + ", ".join(unexpected[:show]))
    return (
        f"weights file {str(path)!r} does not fit backbone {spec.name!r} "
        f"(expected {spec.arch_label}, width {spec.embed_dim}, {spec.depth} blocks; "
        f"the file has {len(sd)} tensors{_describe_file(sd)}): " + " | ".join(parts)
    )


def _describe_file(sd: Mapping[str, torch.Tensor]) -> str:
    """Best-effort guess of the file's architecture, to make mismatch errors self-explaining."""
    bits = []
    for key in ("cls_token", "norm.weight"):
        if key in sd and sd[key].ndim >= 1:
            bits.append(f"width {sd[key].shape[-1]}")
            break
    pe = sd.get("patch_embed.proj.weight")
    if pe is not None and pe.ndim == 4:
        bits.append(f"patch {pe.shape[-1]}")
    blocks = {m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        bits.append(f"{len(blocks)} blocks")
    return ", looks like " + ", ".join(bits) if bits else ""


# --------------------------------------------------------------------------------------
# Official weights through the Hugging Face Hub cache


def offline_mode() -> bool:
    """Whether downloads are off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, as huggingface_hub reads them)."""
    # huggingface_hub reads HF_HUB_OFFLINE once at import; also honour it when set later.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def resolve_official_weights(spec: BackboneSpec) -> Path:
    """Path of the official weights of ``spec`` in the Hub cache, downloaded if needed.

    Raises ``BackboneWeightsError`` (without a chained network traceback) when the backbone has
    no official weights, when offline and the file is not cached, or when the download fails.
    """
    if not spec.has_official_weights:
        raise BackboneWeightsError(
            f"backbone {spec.name!r} has no official pretrained weights: use --random-backbone for a random "
            "initialisation (Python: pretrained=False, config: backbone.pretrained=false), or pass a weights "
            "file with --weights FILE (Python: weights=FILE)"
        )
    if spec.download_url:
        return _resolve_url_weights(spec)
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    if offline_mode():
        # Pure cache lookup: no network request, so this answers in milliseconds.
        for filename in _HUB_FILENAMES:
            cached = huggingface_hub.try_to_load_from_cache(spec.hf_hub_id, filename)
            if isinstance(cached, str):
                return Path(cached)
        raise BackboneWeightsError(_unavailable_message(spec, "offline mode (HF_HUB_OFFLINE) and not in the cache"))

    reason = ""
    for filename in _HUB_FILENAMES:
        try:
            return Path(huggingface_hub.hf_hub_download(spec.hf_hub_id, filename))
        except RemoteEntryNotFoundError:
            continue  # the repository exists but stores the other file format
        except LocalEntryNotFoundError:
            reason = "no connection to the Hugging Face Hub and not in the cache"
            break
        except Exception as exc:  # noqa: BLE001 -- network / HTTP / auth failures: same advice
            reason = f"{type(exc).__name__}: {short_error(exc)}"
            break
    raise BackboneWeightsError(_unavailable_message(spec, reason or "no weights file in the repository")) from None


def url_weights_path(spec: BackboneSpec) -> Path:
    """Where a direct-download official file lives: ``torch.hub.get_dir()/checkpoints/<file>``,
    the path ``torch.hub.load_state_dict_from_url`` uses for the same URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file


def _resolve_url_weights(spec: BackboneSpec) -> Path:
    """The file of ``spec.download_url`` from torch.hub's checkpoint cache, downloaded if missing."""
    target = url_weights_path(spec)
    if target.is_file():
        return target
    if offline_mode():
        raise BackboneWeightsError(_unavailable_message(
            spec, f"offline mode (HF_HUB_OFFLINE) and not in torch.hub's cache ({target})"))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes a temporary file beside the target and renames it: no half file is left behind.
        torch.hub.download_url_to_file(spec.download_url, str(target), progress=sys.stderr.isatty())
    except Exception as exc:  # noqa: BLE001 -- URLError, HTTPError, OSError, ...: same advice
        raise BackboneWeightsError(_unavailable_message(spec, f"download failed ({type(exc).__name__}: "
                                                               f"{short_error(exc)})")) from None
    return target


def _unavailable_message(spec: BackboneSpec, reason: str) -> str:
    return (
        f"cannot get pretrained weights for backbone {spec.name!r} ({spec.description}): {reason}. "
        f"It needs the file {spec.weights_file} from {spec.download_url or spec.weights_source}. "
        f"Download it where there is internet access and pass it with --weights FILE "
        f"(Python: create_backbone({spec.name!r}, weights=FILE)), or use --random-backbone for random weights "
        f"(Python: pretrained=False)."
    )
