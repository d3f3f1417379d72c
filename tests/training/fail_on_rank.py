"""Run `loraens` with a training step that fails on one rank: ``python fail_on_rank.py RANK
EPOCH ARGS...`` raises on process RANK at the start of (1-based) EPOCH, then behaves as the CLI.

Used by test_distributed.py under torchrun to check that one failing rank stops the whole job
with its error visible, and that the run directory does not look complete.
"""

from __future__ import annotations

import os
import sys

from loraens.cli.main import main
from loraens.training.trainer import EnsembleTrainer


def _install(rank: int, epoch: int) -> None:
    real = EnsembleTrainer.train_epoch

    def failing(self, index, progress=False):
        if int(os.environ.get("RANK", "0")) == rank and index + 1 == epoch:
            raise RuntimeError(f"simulated failure on rank {rank} in epoch {epoch}")
        return real(self, index, progress)

    EnsembleTrainer.train_epoch = failing


if __name__ == "__main__":
    _install(int(sys.argv[1]), int(sys.argv[2]))
    main(sys.argv[3:])
