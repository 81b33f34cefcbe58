import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network: the model hub must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    return DATA

# Tests run as parallel workers (pytest -n 2) on small tensors: one thread each avoids
# oversubscribing the cores, which made steps many times slower.
torch.set_num_threads(1)
