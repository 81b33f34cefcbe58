"""Training on several processes (``torchrun``): one model, one global batch, global hidden positives.

The job trains the model one process would train on the same global batch:

- **One model.** Every rank builds the heads, EMA head and probes from the same seed and then
  takes rank 0's weights (:func:`broadcast_module`); gradients are averaged over ranks in one flat
  all-reduce (``runtime.average_gradients``), so weights, EMA and optimiser moments stay equal.
  Only channel dropout draws differ per rank (each rank's RNG is seeded ``seed + rank``).
- **One global batch.** ``train.batch_size`` is the global batch B, the single-process epoch order;
  rank r holds images [r·B/W, (r+1)·B/W) of each batch (:func:`rank_share`).
- **Global hidden positives** (``train.positives=global``, the default): each rank gathers f, s′,
  z and z^mix of the whole batch in rank order (:func:`gather_rows`; z and z^mix through
  :class:`_GatherWithGradients`, whose backward sums the gathered gradients over ranks and returns
  each rank its own rows) and computes the loss terms of its own anchors against all N patches,
  normalised by the global batch (``hidden_positive_loss(..., anchor_images=...)``). The shares
  add up to the single-process loss: each rank back-propagates W × its share, and the average of
  the gradients over ranks is the gradient of the whole loss.
- ``train.positives=local``: each rank finds positives within its own B/W images only (no
  gathering; an anchor sees 1/W of the batch the method is defined on).
- **Threshold pools** are built once for the job: each rank computes its share of every pool
  batch, and the picked rows are gathered (``training.pools.collect_pool``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hpseg.errors import InvalidInputError
from hpseg.runtime import DistributedContext, broadcast_from_first


def check_batch_split(batch_size: int, context: DistributedContext) -> int:
    """Images per rank of a global batch of ``batch_size``; an error when it does not divide."""
    if batch_size % context.world_size:
        raise InvalidInputError(
            f"train.batch_size={batch_size} is the global batch and must divide evenly over the "
            f"{context.world_size} ranks of this job: pick a multiple of {context.world_size}"
        )
    return batch_size // context.world_size


def share_bounds(size: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s consecutive part of ``size`` items split as evenly as possible (earlier
    ranks take one more when it does not divide)."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def rank_share(batch: list[int], context: DistributedContext) -> list[int]:
    """This rank's consecutive part of a global batch."""
    return batch[share_bounds(len(batch), context.rank, context.world_size)]


def rank_images(images_per_rank: int, context: DistributedContext) -> range:
    """The images of a gathered global batch that are this rank's own."""
    return range(context.rank * images_per_rank, (context.rank + 1) * images_per_rank)


def broadcast_module(module: torch.nn.Module, context: DistributedContext) -> None:
    """Every rank takes rank 0's parameters and buffers (in place)."""
    broadcast_from_first([*module.parameters(), *module.buffers()], context)


@torch.no_grad()
def check_same_weights(module: torch.nn.Module, context: DistributedContext) -> None:
    """Raise when the ranks' copies of ``module`` differ (one small all-gather of per-tensor sums)."""
    if not context.enabled:
        return
    names, tensors = zip(*[*module.named_parameters(), *module.named_buffers()])
    sums = torch.stack([t.detach().double().sum() for t in tensors])
    everyone = gather_rows(sums[None], context)
    differs = (everyone != everyone[0]).any(0)
    if bool(differs.any()):
        name = names[int(differs.nonzero()[0])]
        raise RuntimeError(f"the ranks of this job hold different weights ({name} first): they no longer train one model")


def gather_rows(rows: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """(n, ...) on every rank -> (W·n, ...): all ranks' rows in rank order, no gradient."""
    if not context.enabled:
        return rows
    parts = [torch.empty_like(rows) for _ in range(context.world_size)]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


class _GatherWithGradients(torch.autograd.Function):
    """All ranks' (n, D) rows in rank order; backward returns each rank the sum over ranks of the
    gradients of its own rows (every rank's loss share reaches every row)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, context: DistributedContext) -> torch.Tensor:  # type: ignore[override]
        ctx.context = context
        return gather_rows(rows.detach(), context)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        context: DistributedContext = ctx.context
        grad = grad.contiguous()
        n = grad.shape[0] // context.world_size
        if dist.get_backend() == "nccl":
            own = torch.empty((n, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(own, grad)
            return own, None
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad[context.rank * n : (context.rank + 1) * n].clone(), None


def gather_with_gradients(rows: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """:func:`gather_rows` through which gradients flow back to each rank's own rows."""
    if not context.enabled:
        return rows
    return _GatherWithGradients.apply(rows, context)


def sum_over_ranks(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """A detached copy of ``value`` summed over ranks."""
    value = value.detach().clone()
    if context.enabled:
        dist.all_reduce(value)
    return value


def gather_uneven(rows: torch.Tensor, sizes: list[int], context: DistributedContext) -> torch.Tensor:
    """Like :func:`gather_rows` for ranks holding ``sizes[r]`` rows each (known to every rank)."""
    if not context.enabled:
        return rows
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = gather_rows(padded, context)
    return torch.cat([gathered[r * max(sizes) : r * max(sizes) + size] for r, size in enumerate(sizes)])
