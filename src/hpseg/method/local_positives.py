"""Local hidden positives (LHP, spec §4): attention-weighted propagation to 3x3 neighbours.

The last-block attention of the frozen backbone says which neighbours of a patch belong with
it. Its input is the attention *scores before the softmax* (q·kᵀ/√d), as the reference's
``get_intermediate_feat`` returns them (``Backbone(..., with_attention=True).attention_scores``);
fed the probabilities instead, the percentile clamp and softmax of steps 2-3 act on numbers
around 1/T and the weights come out nearly uniform. Each patch keeps at most 9 weights (its 3x3 neighbourhood, itself included), so we store
and use them as a (B, hw, 9) tensor instead of the (B, hw, hw) matrix that is mostly zeros.
Neighbour k of patch (y, x) is (y + dy, x + dx) with (dy, dx) = NEIGHBOUR_OFFSETS[k].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def neighbour_indices(height: int, width: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of every patch's 3x3 neighbours and whether they lie inside the grid.

    Returns (index (hw, 9) int64, valid (hw, 9) bool); outside cells point at patch 0 and are
    marked invalid.
    """
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ys, xs = ys.reshape(-1, 1), xs.reshape(-1, 1)
    dy = torch.tensor([o[0] for o in NEIGHBOUR_OFFSETS], device=device)
    dx = torch.tensor([o[1] for o in NEIGHBOUR_OFFSETS], device=device)
    ny, nx = ys + dy, xs + dx
    valid = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
    index = torch.where(valid, ny * width + nx, torch.zeros_like(ny))
    return index, valid


def neighbourhood_counts(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(hw,) number of grid cells in each patch's 3x3 neighbourhood: 4 at corners, 6 on edges, 9 inside."""
    return neighbour_indices(height, width, device)[1].sum(1)


def row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile ``q`` of each row of (..., n) with linear interpolation, as ``torch.quantile``.

    Written out because ``torch.quantile`` refuses inputs above 2**24 elements (a batch of
    ViT-S/8 attention maps is larger). Returns (..., 1).
    """
    ordered = rows.sort(dim=-1).values
    position = q * (rows.shape[-1] - 1)
    below = int(position)
    above = min(below + 1, rows.shape[-1] - 1)
    fraction = position - below
    low, high = ordered[..., below : below + 1], ordered[..., above : above + 1]
    return torch.lerp(low, high, torch.full_like(low, fraction))


def attention_neighbour_weights(
    attention: torch.Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    sigma: float = 28.0,
    clamp_quantiles: tuple[float, float] = (0.1, 0.9),
    images_per_chunk: int = 16,
) -> torch.Tensor:
    """Process last-block attention into LHP neighbour weights (spec §4 steps 1-5).

    1. drop prefix (class / register) rows and columns, average heads -> a (hw, hw);
    2. clamp each row to its own [10th, 90th] percentile;
    3. softmax each row, times ``sigma``;
    4. zero every entry below its row's mean;
    5. keep the 3x3 neighbourhood of each patch.

    Args:
        attention: (B, heads, P + hw, P + hw) last-block attention scores before the softmax
            (q·kᵀ/√d), prefix tokens first.
        grid: (h, w) patch grid, h * w = hw.
    Returns:
        (B, hw, 9) float32 weights a_ij of neighbour k = NEIGHBOUR_OFFSETS[k]; 0 outside the grid.
    """
    height, width = grid
    hw = height * width
    if attention.shape[-1] != num_prefix_tokens + hw or attention.shape[-2] != num_prefix_tokens + hw:
        raise ValueError(
            f"attention of shape {tuple(attention.shape)} does not match a {height}x{width} grid "
            f"with {num_prefix_tokens} prefix tokens"
        )
    index, valid = neighbour_indices(height, width, attention.device)
    out = []
    # Chunks of images bound the memory of the (chunk, hw, hw) sort below.
    for part in attention.split(images_per_chunk):
        a = part[:, :, num_prefix_tokens:, num_prefix_tokens:].float().mean(1)
        a = torch.maximum(torch.minimum(a, row_quantile(a, clamp_quantiles[1])), row_quantile(a, clamp_quantiles[0]))
        a = a.softmax(-1) * sigma
        a = a.masked_fill(a < a.mean(-1, keepdim=True), 0.0)
        weights = torch.gather(a, 2, index.unsqueeze(0).expand(a.shape[0], -1, -1))
        out.append(weights * valid)
    return torch.cat(out)


def propagate_to_neighbours(segmentation: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """s^mix_i = (sum_{j in N3x3(i)} a_ij s_j) / |N3x3(i)| — divided by the cell count, not the weights' sum.

    Args:
        segmentation: (B, D, h, w) segmentation features s.
        weights: (B, h*w, 9) neighbour weights from :func:`attention_neighbour_weights`.
    Returns:
        (B, D, h, w) propagated features; gradient reaches neighbour j of i in proportion to a_ij.
    """
    batch, _, height, width = segmentation.shape
    padded = F.pad(segmentation, (1, 1, 1, 1))
    grid_weights = weights.to(segmentation.dtype).transpose(1, 2).reshape(batch, 9, 1, height, width)
    mixed = torch.zeros_like(segmentation)
    # Nine shifted views instead of an unfold: memory stays at a few (B, D, h, w) tensors.
    for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        mixed = mixed + grid_weights[:, k] * padded[:, :, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
    counts = neighbourhood_counts(height, width, segmentation.device).to(segmentation.dtype)
    return mixed / counts.reshape(1, 1, height, width)
