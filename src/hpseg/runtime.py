"""Where and how computation runs: device choice, mixed precision, seeding, distributed ranks,
CPU cores and threads."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hpseg.errors import InvalidInputError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks this rank's CUDA device when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {name!r} was asked for but CUDA is not available on this machine")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting: auto = float16 on CUDA and nothing on the CPU."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp in ("auto", "fp16"):
        if device.type != "cuda":
            raise InvalidInputError("amp=fp16 needs a CUDA device; use amp=bf16 or amp=none on the CPU")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    raise InvalidInputError(f"unknown amp setting {amp!r}; expected auto, fp16, bf16 or none")


# [ref quirk] the reference's GradScaler(init_scale=2048, growth_interval=1000); PyTorch's defaults
# (65,536 and 2,000) skip the first float16 steps while the scale falls to a workable value.
_GRAD_SCALER_SETTINGS = {"reference": {"init_scale": 2048.0, "growth_interval": 1000},
                         "pytorch": {"init_scale": 65536.0, "growth_interval": 2000}}


def make_grad_scaler(setting: str, device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """The loss scaler of float16 training: ``setting`` = "reference" or "pytorch" (``train.grad_scaler``)."""
    if setting not in _GRAD_SCALER_SETTINGS:
        raise InvalidInputError(f"unknown grad scaler setting {setting!r}; expected one of {sorted(_GRAD_SCALER_SETTINGS)}")
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
        raise InvalidInputError(f"{COLLECTIVE_TIMEOUT_ENV}={text!r}: expected a positive, finite number of seconds "
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


# ---------------------------------------------------------------------------- CPU cores and threads

#: cgroup v2 and v1 files holding a CPU quota (a container limited to a few of the host's cores).
_CGROUP_V2_MAX, _CGROUP_V1_QUOTA, _CGROUP_V1_PERIOD = "cpu.max", "cpu.cfs_quota_us", "cpu.cfs_period_us"


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (``quota / period``), None when unlimited
    or unreadable. Reads cgroup v2's ``cpu.max`` ("max 100000" or "200000 100000"), else v1's
    ``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (-1 = unlimited)."""
    try:
        if (root / _CGROUP_V2_MAX).is_file():
            quota, period = (root / _CGROUP_V2_MAX).read_text().split()[:2]
        else:
            quota = (root / "cpu" / _CGROUP_V1_QUOTA).read_text().strip()
            period = (root / "cpu" / _CGROUP_V1_PERIOD).read_text().strip()
        if quota in ("max", "-1") or float(period) <= 0:
            return None
        return float(quota) / float(period)
    except (OSError, ValueError):
        return None


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPU cores this process may use: its affinity mask (``taskset``, a batch scheduler's
    binding), capped by a cgroup CPU quota (containers), and under ``torchrun`` divided between
    the ranks on this machine (``LOCAL_WORLD_SIZE``). At least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, int(quota)))  # a 1.5-core quota gives one busy thread its core
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // ranks_here)


def choose_threads(workers_started: int, requested: int | None = None, cores: int | None = None) -> tuple[int, str]:
    """torch's intra-op threads for a command that starts ``workers_started`` worker processes
    (data-loader workers, CRF workers) and why: ``requested`` (``--threads``) when given, else
    ``OMP_NUM_THREADS`` when set, else the available cores the workers leave (at least 1: threads
    beyond the free cores only wait for each other, on a shared machine much slower than one)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: the number of CPU threads must be at least 1")
        return requested, "--threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores = available_cores() if cores is None else cores
    return max(1, cores - workers_started), f"{cores} core(s) available, {workers_started} worker process(es) started"


def fit_threads(workers_started: int, requested: int | None = None) -> int:
    """Set torch's intra-op threads by :func:`choose_threads` and log the choice; returns it."""
    threads, reason = choose_threads(workers_started, requested)
    torch.set_num_threads(threads)
    logging.getLogger(__name__).info(f"torch uses {threads} CPU thread(s) ({reason})")
    return threads


def default_crf_workers(loader_workers: int, cores: int | None = None) -> int:
    """CRF worker processes by default: the cores available that the data loader's workers leave (at least 1)."""
    return max(1, (available_cores() if cores is None else cores) - loader_workers)
