"""Fixtures shared by the test modules. The session-scoped ones are built once per test process
(once per worker under ``pytest -n 2``) and are read-only: a test that changes one works on a copy."""

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import DATA, Notices, synthetic_prepared, tiny_config

# Tests never touch the network: the model hub must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Steps of the tiny run: validated once (val_interval 6), so the run has best.pt with its metrics.
TINY_RUN_STEPS = 6


#: Per-test limit of the tests marked ``slow`` (several ranks training, a browser); the others have
#: the ``timeout`` of pyproject.toml. Generous: a hung test fails instead of stalling the run.
SLOW_TIMEOUT_S = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic folder dataset (8 training images, their 32 px five-crops prepared, 4 validation
    images, 4 classes). A test that writes into a dataset (a feature cache in its default place, a
    broken image) makes its own with :func:`tests.helpers.synthetic_prepared`."""
    return synthetic_prepared(tmp_path_factory.mktemp("hpseg-tiny-data"))


@pytest.fixture(scope="session")
def tiny_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run on ``data_root`` (random vit_tiny_p8, 32 px crops): checkpoints/last.pt and
    best.pt, metrics.jsonl. Copy it (``shutil.copytree``) to change it."""
    from hpseg.training.trainer import train  # imported when a test asks for a run, not at collection

    runs = tmp_path_factory.mktemp("hpseg-tiny-run")
    run = runs / "run"
    shutil.rmtree(run, ignore_errors=True)
    return train(tiny_config(data_root, runs, steps=TINY_RUN_STEPS), run_dir=run)


@pytest.fixture
def hpseg_logger() -> Iterator[None]:
    """``main`` configures the ``hpseg`` logger; put it back as it was for the other tests."""
    logger = logging.getLogger("hpseg")
    state = logger.level, logger.propagate, list(logger.handlers)
    yield
    logger.setLevel(state[0])
    logger.propagate = state[1]
    logger.handlers[:] = state[2]


@pytest.fixture
def notices() -> Iterator[Notices]:
    """What the ``hpseg`` logger says during a test, at INFO and above. On the logger itself,
    not on caplog's root handler: ``hpseg`` commands (``configure_logging``) stop propagation."""
    logger, handler = logging.getLogger("hpseg"), Notices()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)

# Tests run as parallel workers (pytest -n 2) on small tensors: one thread each avoids
# oversubscribing the cores, which made steps many times slower. OMP_NUM_THREADS too, so that
# commands run in-process or as subprocesses (hpseg.runtime.fit_threads) keep to one.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
