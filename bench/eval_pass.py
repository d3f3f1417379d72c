"""How long scoring a trained run takes at several question batch sizes (pass sizes).

Scores the first 96 ARC-Easy eval questions with every member of RUN at each batch size and
checks the log-probabilities agree. Sizes inference.PASS_TOKENS; run on an idle machine:

    .venv/bin/python bench/eval_pass.py runs/demo-<timestamp> 4,2,1,8,32
"""

from __future__ import annotations

import sys
import time

import numpy as np

from loraens.config import DataConfig
from loraens.data.sources import load_run_data
from loraens.evaluation import inference
from loraens.evaluation.evaluate import score_questions
from loraens.rundir.load import load_run


def main() -> None:
    loaded = load_run(sys.argv[1], "cpu", "fp32")
    _, questions = load_run_data(DataConfig(task="arce", eval_limit=96))
    inference.PASS_TOKENS = 1 << 30  # the batch size alone shapes the passes here
    score_questions(loaded, questions[:8], batch_size=8)  # warm-up
    reference = None
    for batch_size in (int(x) for x in sys.argv[2].split(",")):
        start = time.perf_counter()
        log_probs = score_questions(loaded, questions, batch_size=batch_size)
        seconds = time.perf_counter() - start
        reference = log_probs if reference is None else reference
        finite = np.isfinite(reference)
        diff = np.max(np.abs(log_probs[finite] - reference[finite]))
        print(f"batch {batch_size:3d}: {seconds:6.1f} s, max |diff| {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
