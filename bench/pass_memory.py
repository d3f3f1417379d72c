"""Peak memory of one training pass against its token count: the constants of
src/loraens/training/memory.py (OVERHEAD, HALF_OVERHEAD), measured on the default model.

    .venv/bin/python bench/pass_memory.py --precision bf16
    .venv/bin/python bench/pass_memory.py --precision fp32

Each step of the make-demo setting (cqa by answer text, M = 5, batch 8, packed rows of 256)
is run under several token budgets; before each, the heap is trimmed and the kernel's peak-RSS
counter reset (/proc/self/clear_refs), so the step's peak RSS minus its starting RSS is what
its largest pass added. A least-squares line through (pass tokens, added MB) gives the bytes
per token, printed beside what the trainer's estimate assumes. Linux only; the first two steps
warm the kernel caches and are left out.
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import numpy as np
import torch

from loraens.config import OptimConfig
from loraens.data.prompts import encode_questions, scoring_label_ids
from loraens.data.tasks import load_task
from loraens.models.loading import cast_parameters, load_base_model, matmul_weights
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import resolve_matmul_dtype, resolve_runtime
from loraens.training.memory import activation_bytes_per_token
from loraens.training.optim import build_optimizer
from loraens.training.trainer import EnsembleTrainer, epoch_order

MB = 2**20


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    runtime = resolve_runtime("cpu", args.precision)
    base = load_base_model()
    cast_parameters(matmul_weights(base.model), resolve_matmul_dtype("auto", runtime))
    questions = load_task("cqa")[0][:96]
    encoded = encode_questions(base.tokenizer, questions, 512, "answer_text", "none")
    labels = torch.tensor(scoring_label_ids(base.tokenizer, 5, "answer_text"))
    ensemble = LoRAEnsemble(base.model, 5)
    ensemble.init_members(list(range(5)))
    optimizer = build_optimizer(ensemble, OptimConfig(lr=1e-3))
    trainer = EnsembleTrainer(
        ensemble, optimizer, encoded, labels, runtime, data_seeds=range(5), batch_size=8,
        loss="option_nll",
    )  # fmt: skip
    orders = [epoch_order(trainer.lengths, 8, seed, 0, None) for seed in range(5)]
    trim = ctypes.CDLL("libc.so.6").malloc_trim
    points = []
    trainer.pass_log = []
    for step in range(args.steps):
        for budget in (256, 512, 768, 1024):
            trainer.budget_tokens = budget
            optimizer.zero_grad(set_to_none=True)
            trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            start, _ = rss_mb()
            trainer._step([order[step] for order in orders])
            _, peak = rss_mb()
            tokens = max(rows * width for rows, width, _ in trainer.pass_log)
            trainer.pass_log.clear()
            if step >= 2:
                points.append((tokens, peak - start))
                added = peak - start
                print(f"step {step} budget {budget}: largest pass {tokens} tokens, +{added:.0f} MB")
    tokens, added = np.array(points, dtype=float).T
    slope, intercept = np.polyfit(tokens, added, 1)
    estimate = activation_bytes_per_token(base.model.config, runtime.autocast_dtype) / MB
    print(f"{args.precision}: {intercept:.0f} MB + {slope:.3f} MB per token")
    # The trainer's estimate folds the fixed part in at the scale of its 1 GB budget.
    print(f"trainer's estimate: {estimate:.3f} MB per token")


if __name__ == "__main__":
    main()
