"""The progressive weight lambda of task-specific positives (spec §3)."""

from __future__ import annotations


def lambda_schedule(step: int, warmup: int, total_steps: int) -> float:
    """Weight of the task-specific positives at training step ``step`` (0-based).

    lambda = 0 while ``step <= warmup``, then rises linearly to 1 at ``step == total_steps``:
    ``(step - warmup) / (total_steps - warmup)``, clipped to [0, 1].
    """
    if step <= warmup or total_steps <= warmup:
        return 0.0
    return min(1.0, (step - warmup) / (total_steps - warmup))
