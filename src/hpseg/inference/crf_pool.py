"""The dense CRF on every core: images refined in worker processes, in order, a few at a time.

One 10-iteration CRF of a 320x320 image with 27 classes takes about 1.5 s of one core and holds
the GIL, so ``hpseg eval --crf`` over a validation set is hours in one process. :class:`CRFPool`
hands each image's CRF to a pool of worker processes while the main process goes on with the
backbone work of the next batch:

* **Same results as the serial path**: a worker runs the very :func:`hpseg.inference.crf.dense_crf`
  call the main process would, on the same float32 probabilities, and results come back in the
  order the images went in.
* **Bounded memory**: at most ``in_flight`` images (default twice the workers) are handed out
  and not yet taken back; the next image is computed only when one comes back.
* **No hang**: a worker that dies (killed, out of memory) ends the pool with
  :class:`CRFWorkerError`; Ctrl-C in the main process stops the workers (they ignore SIGINT
  themselves, so that only the main process decides) and re-raises ``KeyboardInterrupt``.

``workers=0`` refines in this process, one image after another (the reference's way).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from hpseg.errors import HpsegError
from hpseg.inference.crf_numpy import refine_labels
from hpseg.logs import progress_bar

__all__ = ["CRFPool", "CRFWorkerError"]

logger = logging.getLogger(__name__)

Meta = TypeVar("Meta")


class CRFWorkerError(HpsegError, RuntimeError):
    """A CRF worker process died (killed, or out of memory); the pool was shut down. The user can
    act on it (fewer workers, or none), so the command says it in one line."""


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the main process, which stops them (a terminal sends SIGINT to all)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class CRFPool:
    """Refine images with the dense CRF in ``workers`` processes (0: in this process).

    Use as a context manager; :meth:`map` streams results in input order::

        with CRFPool(workers=8) as pool:
            for meta, labels in pool.map(jobs, total=n_images):   # jobs: (meta, (image, [probs, ...]))
                ...

    ``task`` is the function a worker runs on each job's arguments (default
    :func:`hpseg.inference.crf_numpy.refine_labels`); it must be importable by name (module level)
    for the worker processes to find it where they are spawned rather than forked (not Linux; a
    script then needs its work under ``if __name__ == "__main__":``, as any multiprocessing).
    """

    def __init__(self, workers: int, *, in_flight: int | None = None,
                 task: Callable[..., Any] = refine_labels) -> None:
        if workers < 0:
            raise ValueError(f"workers={workers}: the number of CRF worker processes must be 0 or more")
        self.workers = workers
        self.in_flight = max(1, in_flight if in_flight is not None else 2 * workers)
        self.task = task
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> CRFPool:
        if self.workers > 0:
            # Linux: fork, a worker starts at once (a spawned one would import the main script and
            # torch, 10 s on a busy machine); it runs numpy and pydensecrf only, never torch, CUDA or
            # OpenMP, so this process's threads do not matter to it. Elsewhere the platform's default.
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_ignore_interrupts)
            logger.info(f"dense CRF in {self.workers} worker processes")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is KeyboardInterrupt and self.workers > 0:
            logger.warning(f"interrupted: stopping the {self.workers} CRF worker processes")
        self.close(cancel=exc_type is not None)  # on an error, do not refine what no one will read

    def close(self, *, cancel: bool = False) -> None:
        """Stop the workers (waiting for those mid-image, about one CRF at most)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
            self._executor = None

    def map(self, jobs: Iterable[tuple[Meta, tuple[Any, ...]]], *, total: int | None = None,
            desc: str = "CRF") -> Iterator[tuple[Meta, Any]]:
        """``(meta, task(*args))`` for each ``(meta, args)`` of ``jobs``, in order, with a progress
        bar counting refined images. ``jobs`` is read lazily: the next job is built (its backbone
        work done) while the workers refine the ones before it."""
        results = self._serial(jobs) if self._executor is None else self._parallel(jobs, self._executor)
        return iter(progress_bar(results, logger, total=total, desc=desc, unit="image", leave=False))

    def _serial(self, jobs: Iterable[tuple[Meta, tuple[Any, ...]]]) -> Iterator[tuple[Meta, Any]]:
        for meta, args in jobs:
            yield meta, self.task(*args)

    def _parallel(self, jobs: Iterable[tuple[Meta, tuple[Any, ...]]],
                  executor: ProcessPoolExecutor) -> Iterator[tuple[Meta, Any]]:
        pending: deque[tuple[Meta, Future[Any]]] = deque()
        try:
            for meta, args in jobs:
                pending.append((meta, executor.submit(self.task, *args)))
                if len(pending) >= self.in_flight:
                    yield self._oldest(pending)
            while pending:
                yield self._oldest(pending)
        except BaseException:  # Ctrl-C, a dead worker, an error in the caller's loop: stop the workers now
            self.close(cancel=True)
            raise

    def _oldest(self, pending: deque[tuple[Meta, Future[Any]]]) -> tuple[Meta, Any]:
        meta, future = pending.popleft()
        try:
            return meta, future.result()
        except BrokenProcessPool as err:
            raise CRFWorkerError(
                f"a dense-CRF worker process died (killed, or out of memory?) with {len(pending) + 1} image(s) "
                f"in flight; the {self.workers} workers were stopped. Rerun with fewer --crf-workers, or "
                "--crf-workers 0 to refine in the main process (crf_workers=0 in Python; a Python script "
                "that starts workers needs its work under `if __name__ == \"__main__\":`)") from err
