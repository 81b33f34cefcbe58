"""Where and how computation runs: device choice, mixed precision, seeding, distributed ranks."""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks this rank's CUDA device when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting: auto = float16 on CUDA and nothing on the CPU."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "fp16"):
        if device.type != "cuda":
            raise ValueError("amp=fp16 needs a CUDA device; use amp=bf16 or amp=none on the CPU")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    raise ValueError(f"unknown amp setting {amp!r}; expected auto, fp16, bf16 or none")


# [ref quirk] the reference's GradScaler(init_scale=2048, growth_interval=1000); PyTorch's defaults
# (65,536 and 2,000) skip the first float16 steps while the scale falls to a workable value.
_GRAD_SCALER_SETTINGS = {"reference": {"init_scale": 2048.0, "growth_interval": 1000},
                         "pytorch": {"init_scale": 65536.0, "growth_interval": 2000}}


def make_grad_scaler(setting: str, device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler of float16 training: ``setting`` = "reference" or "pytorch" (``train.grad_scaler``)."""
    if setting not in _GRAD_SCALER_SETTINGS:
        raise ValueError(f"unknown grad scaler setting {setting!r}; expected one of {sorted(_GRAD_SCALER_SETTINGS)}")
    return torch.amp.GradScaler(device.type, enabled=enabled, **_GRAD_SCALER_SETTINGS[setting])


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


#: Seconds a collective waits for the other ranks before it fails (a rank that died or hangs).
COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S = "HPSEG_COLLECTIVE_TIMEOUT", 600.0
#: The longest timeout accepted (a year): torch keeps it in milliseconds, and "wait forever" is
#: what the timeout exists to prevent.
MAX_COLLECTIVE_TIMEOUT_S = 365 * 24 * 3600.0


def collective_timeout() -> datetime.timedelta:
    """``$HPSEG_COLLECTIVE_TIMEOUT`` seconds (default 600: longer than any one rank's solo work, a
    checkpoint save or a pool pass, yet a lost rank frees the job's GPUs within ten minutes)."""
    text = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_COLLECTIVE_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_COLLECTIVE_TIMEOUT_S:  # nan and inf fail too
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV}={text!r}: expected a positive, finite number of seconds "
                         f"(at most {MAX_COLLECTIVE_TIMEOUT_S:.0f}, a year)")
    return datetime.timedelta(seconds=seconds)


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); its collectives
    fail after :func:`collective_timeout` instead of waiting forever for a lost rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if device.type == "cuda":
        # Before joining: NCCL binds this process to its own GPU (LOCAL_RANK, ``resolve_device``).
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    return DistributedContext(dist.get_rank(), dist.get_world_size())


@torch.no_grad()
def broadcast_from_first(tensors: list[torch.Tensor], context: DistributedContext) -> None:
    """Every rank takes rank 0's values of ``tensors`` (in place)."""
    if context.enabled:
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: list[torch.nn.Parameter], context: DistributedContext) -> None:
    """Average gradients across ranks in one flat all-reduce (the heads are a few MB: one bucket,
    one collective per step instead of one per parameter)."""
    if not context.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= context.world_size
    for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(part.view_as(grad))
