"""``hpseg`` under torchrun with a rank that dies: ``python dying_rank.py STEP RECORD hpseg-args...``.

Rank 1 SIGKILLs itself when it is about to train step STEP + 1. It has then trained step STEP
with rank 0, which rank 0 starts only after it saved the checkpoints due at STEP - 1 and
before: so ``last.pt`` is complete, and rank 1 first writes its SHA-256 to RECORD (the test
checks that the failure leaves it unchanged). Used by tests/test_lost_ranks.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

from hpseg.cli.main import main
from hpseg.training.trainer import Trainer


def _dying(kill_at: int, record: Path):
    train_step = Trainer.training_step

    def training_step(self: Trainer, inputs, lmbd):
        if self.context.rank == 1 and self.state.step == kill_at:
            last = self.run_dir / "checkpoints" / "last.pt"
            record.write_text(hashlib.sha256(last.read_bytes()).hexdigest())
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self, inputs, lmbd)

    return training_step


if __name__ == "__main__":
    Trainer.training_step = _dying(int(sys.argv[1]), Path(sys.argv[2]))  # type: ignore[method-assign]
    sys.exit(main(sys.argv[3:]))
