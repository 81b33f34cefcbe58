"""``hpseg`` under torchrun with a rank that dies: ``python dying_rank.py STEP RECORD hpseg-args...``.

Rank 1 SIGKILLs itself when it is about to train step STEP + 1 (of a new run, given with
``--run-dir``). It has then trained step STEP with rank 0, which rank 0 starts only after it
saved the checkpoints due at STEP - 1 and before: so ``last.pt`` is complete, and rank 1 first
writes its SHA-256 to RECORD (the test checks that the failure leaves it unchanged). Used by
tests/test_lost_ranks.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from pathlib import Path

from hpseg.cli.main import main
from hpseg.training import trainer


def _dying(kill_at: int, record: Path, run_dir: Path):
    train_step, steps_done = trainer.training_step, [0]

    def training_step(learner, *args):
        if learner.context.rank == 1 and steps_done[0] == kill_at:
            last = run_dir / "checkpoints" / "last.pt"
            record.write_text(hashlib.sha256(last.read_bytes()).hexdigest())
            os.kill(os.getpid(), signal.SIGKILL)
        steps_done[0] += 1
        return train_step(learner, *args)

    return training_step


if __name__ == "__main__":
    arguments = sys.argv[3:]
    run = Path(arguments[arguments.index("--run-dir") + 1])
    trainer.training_step = _dying(int(sys.argv[1]), Path(sys.argv[2]), run)
    sys.exit(main(arguments))
