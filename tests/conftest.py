import os
from pathlib import Path

import pytest

# Tests never touch the network: the model hub must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    return DATA
