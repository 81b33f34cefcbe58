import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import Notices

# Tests never touch the network: the model hub must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    return DATA


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
