"""Exponential moving average of a module's weights (the task-specific head S', spec §1)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` (no gradients) to be updated with :func:`ema_update_`."""
    ema = copy.deepcopy(module)
    for parameter in ema.parameters():
        parameter.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update_(ema: nn.Module, source: nn.Module, momentum: float) -> None:
    """In place: theta' <- m * theta' + (1 - m) * theta for every parameter; buffers are copied."""
    for ema_param, param in zip(ema.parameters(), source.parameters(), strict=True):
        ema_param.mul_(momentum).add_(param.detach().to(ema_param.dtype), alpha=1.0 - momentum)
    for ema_buffer, buffer in zip(ema.buffers(), source.buffers(), strict=True):
        ema_buffer.copy_(buffer)
