"""Where a training run's wall-clock time goes: seconds per phase, measured inside the run.

The training loop times its phases with one :class:`PhaseTimers` (``Trainer.timers``) and writes
the totals to ``metrics.jsonl`` (a ``{"step": N, "timing": {...}}`` record with every validation
and at the end): ``startup`` (building the trainer: backbone, data, model), ``initial_pools``
(both threshold pools before the first step), ``data_wait`` (waiting for a step's inputs:
the loader, and with the backbone as feature source its forward; ``loader_wait`` is the
loader's part of it, timed by the feature source), ``step`` (the training step),
``renewal`` (task-specific pool renewals), ``validation`` and ``checkpoint`` (writing ``last``
and ``best``). ``benchmarks/whole_run.py`` reads that record.

On a GPU the work of a phase is queued asynchronously; ``synchronize`` (``torch.cuda.synchronize``)
is called at each phase's end so the seconds belong to the phase that queued the work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

PHASES = ("startup", "initial_pools", "data_wait", "loader_wait", "step", "renewal", "validation",
          "validation_features", "checkpoint")
#: Phases timed inside another (not added again to the total): the loader's share of ``data_wait``,
#: the validation features' computation (at the first validation) inside ``validation``.
NESTED = {"loader_wait": "data_wait", "validation_features": "validation"}


class PhaseTimers:
    """Accumulated wall seconds and counts per phase name."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.started = time.perf_counter()
        self._synchronize = synchronize

    def add(self, name: str, seconds: float) -> float:
        """Count one occurrence of ``name`` lasting ``seconds``; returns ``seconds``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1
        return seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as (one more occurrence of) phase ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._synchronize is not None:
                self._synchronize()
            self.add(name, time.perf_counter() - start)

    def summary(self) -> dict[str, Any]:
        """``{"total_s", "seconds", "shares", "counts"}``: total wall seconds since creation, then
        per phase (in ``PHASES`` order, others after) seconds, share of the total and occurrences;
        ``other`` is the rest of the total (logging, progress bar, Python between phases); a
        ``NESTED`` phase's seconds are part of its outer phase's."""
        total = time.perf_counter() - self.started
        names = [n for n in PHASES if n in self.seconds] + sorted(set(self.seconds) - set(PHASES))
        seconds = {name: round(self.seconds[name], 4) for name in names}
        outer = sum(value for name, value in self.seconds.items() if name not in NESTED)
        seconds["other"] = round(max(total - outer, 0.0), 4)
        return {
            "total_s": round(total, 4),
            "seconds": seconds,
            "shares": {name: round(value / total, 4) if total > 0 else 0.0 for name, value in seconds.items()},
            "counts": {name: self.counts.get(name, 0) for name in names},
        }


def device_synchronizer(device: torch.device) -> Callable[[], None] | None:
    """``torch.cuda.synchronize`` for a CUDA device (queued work ends inside its phase), else None."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)



def timed_iteration(items: Iterable[Any], timers: PhaseTimers | None, name: str) -> Iterator[Any]:
    """``items`` one by one, the wait for each counted as phase ``name`` of ``timers`` (when given)."""
    iterator = iter(items)
    while True:
        if timers is None:
            item = next(iterator, _END)
        else:
            with timers.phase(name):
                item = next(iterator, _END)
        if item is _END:
            return
        yield item


_END = object()
