"""Throughput of LoRA-ensemble training and inference: loraens against a plain PEFT loop.

One invocation runs, on the same base model, questions and hyper-parameters:

* **reference**: what a user writes by hand with PEFT. One ``PeftModel`` (one copy of the base
  weights); each member gets a fresh adapter (``add_adapter`` + ``set_adapter``, LoRA r=8,
  alpha=32 on q_proj/v_proj, dropout 0) and is trained alone, one member after the other, with its
  own AdamW (lr 5e-5, weight decay 0.01) and its own shuffled data order. Batches are padded on
  the right to a fixed length (``--reference-pad``: by default the longest prompt of the slice,
  the kindest fixed length; or a number such as 128), the model returns full-vocabulary logits at
  every position, the loss is the cross-entropy at the answer position.
  Inference: for each member switch adapters and run fixed-padded batches, full logits, then the
  label tokens' logits at the answer position. It runs in up to two precisions
  (``--reference-precision``):

  - **fp32**: everything in fp32, the loop as written without any mixed precision.
  - **same** as ours: the loop a user of our half precision writes, i.e. the same loop with the
    forward and the loss inside ``torch.autocast(device_type, dtype=torch.bfloat16)`` (fp16 when
    ours computes in fp16), backward and AdamW step outside it, no GradScaler (ours has none).
    The base model stays in fp32 as loaded, adapters and AdamW moments in fp32: the AMP recipe of
    the PyTorch docs and what ``Trainer(bf16=True)`` turns on. We chose it over loading the base
    in bf16 because ours holds the base exactly so in this bench (fp32 weights, autocast), so
    the two loops differ in the loop alone, and because both loops share one copy of the base
    here (a bf16 copy for the reference would cost a second model in memory or a lossy round
    trip of the shared one). A user whose checkpoint is stored in bf16 does get bf16 weights from
    transformers 5's default ``dtype="auto"``; that variant skips autocast's per-pass weight casts
    and is not measured here.

  The default is both when ours runs in a half precision (only fp32 otherwise, where the two
  coincide). The headline ratio, ours / reference, is like against like: ours in bf16 against
  the bf16 reference; the ratio against the fp32 reference is reported next to it. With
  ``--reference-precision fp32`` only, the headline falls back to the fp32 reference.
* **ours**: :class:`loraens.training.trainer.EnsembleTrainer` as shipped (all M members stacked
  in one batch, length-grouped batches via ``schedule_seed``, questions packed several per row
  (``--packing``, ``--pack-tokens``), passes split to the memory budget
  (``--memory-budget-gb``), autocast dtype from ``resolve_runtime(device, precision)``, LM head
  at the answer position only), and :func:`loraens.evaluation.inference.score_members` for
  inference. ``--precision fp32,bf16`` runs ours once per precision, side by side, each against
  the reference in its own precision (and the fp32 one).

Both loops do ceil(N / batch) optimiser steps per member over the same N questions (one epoch),
with the same per-member data seeds and initialisation seeds. Each is warmed up with one
throw-away step first (outside the timing).

Useful tokens are prompt tokens (no padding); processed tokens include padding (with packing:
the padding at the end of packed rows, and empty rows of members needing fewer rows).

FLOP accounting (matmul FLOPs only, which is what the peak measures). Per row of ``n`` tokens
processed at sequence length ``T`` (``n = T`` for a padded row; the "useful" count uses the
row's own length for both), with ``P`` = weights of every nn.Linear in the decoder layers
(SmolLM2-135M: 106.2M), ``P_lora`` = r·(in+out) summed over one member's wrapped projections
(0.46M), ``L`` layers, ``d_attn`` = heads·head_dim, ``d`` = hidden size, ``V`` = vocabulary,
``K`` = answer letters:

    forward  decoder   F(n, T) = n · (2·P + 2·P_lora + L·4·T·d_attn)
                        (a packed row of T tokens counts attention over the whole row, as
                        the masked attention computes it)
                        (2 FLOPs per weight per token; QKᵀ and AV are 2·T·d_attn each)
    training decoder   n · (2·2·P + 3·2·P_lora + 3·L·4·T·d_attn)
                        frozen base: the backward pass needs input gradients only, as many FLOPs
                        as the forward (no weight gradients), so base linears cost 2× forward;
                        LoRA needs input and weight gradients (3× forward); attention backward
                        computes dQ, dK, dA, dV (3× forward). Layer 0 needs no input gradient
                        for its q/k/v base projections; we ignore that (< 1/L overcount).
    training head      ours: 2·d·V per row forward + 2·d·V backward (input gradient only, the
                        tied embedding is frozen), at the answer position only;
                        reference: the same at every one of the T positions.
    inference head     ours: 2·d·K per row (label rows only); reference: 2·d·V at all T positions.

"Achieved" FLOP/s counts the computation actually done (padding included, reference's full
head included); "useful" FLOP/s counts only what the method needs (unpadded rows, head at the
answer position), identical for both loops, so useful FLOP/s ratios equal token/s ratios. Both
are reported as a fraction of the matmul peak measured in the same run (square matmuls,
best of a few trials) for the dtype the loop computes in (the autocast dtype, fp32 without
autocast; for the references as for ours). Only dtypes the hardware computes in natively are
measured (bf16 on a CPU only with AVX512-BF16 or AMX), plus any a requested ``--precision``
computes in. Elementwise work (norms, softmax, SiLU, RoPE, autocast casts, AdamW) is not
counted: it is where the gap to the peak goes.

On a shared VM the matmul rate itself moves by ±25% from one second to the next, while a
minute-long epoch averages that out. ``--repeats N`` therefore times N more training epochs,
each right after ``--repeat-peak-seconds`` of back-to-back square matmuls, and reports the
median and range of useful FLOP/s over that sustained rate and over the run's best peak.

Peak memory of our training for a small and a large M (``--rss-members``, a couple of steps)
is measured in subprocesses of this script, each with its own peak (``VmHWM``, i.e. peak RSS,
on CPU; ``torch.cuda.max_memory_allocated`` on CUDA), with one member per pass so that
activations are the same size and the difference is the members' own state (weights, gradients,
AdamW moments: about 4 × 1.8 MB per member for SmolLM2), never a second copy of the base.

``--demo-rss`` runs ``loraens train --config configs/demo.yaml`` once per ``--precision``, each
in a fresh process, and reports its wall time, peak RSS (VmHWM) and accuracy.

With ``--profile`` auto/on, torch.profiler records our timed training epoch (a few µs per op
against ops of milliseconds: well under 1% overhead) and the report lists the top ops per step.

Run ``python bench/throughput.py --help`` for the options; results go to stdout (a table) and
to a JSON file under bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import json
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from loraens.config import OptimConfig
from loraens.data.batching import epoch_order
from loraens.data.packing import plan_rows
from loraens.data.prompts import EncodedQuestions, encode_questions, label_token_ids
from loraens.data.tasks import TASKS, load_task
from loraens.evaluation.inference import score_members
from loraens.models.loading import (
    DEFAULT_MODEL,
    cast_parameters,
    hold_matmul_weights_in,
    load_base_model,
    matmul_weights,
)
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import Runtime, cpu_supports_bf16, resolve_matmul_dtype, resolve_runtime
from loraens.training.optim import build_optimizer
from loraens.training.seeds import member_seeds, schedule_seed
from loraens.training.trainer import EnsembleTrainer

REPO = Path(__file__).resolve().parent.parent
RANK, ALPHA, TARGETS, LR, WEIGHT_DECAY = 8, 32.0, ("q_proj", "v_proj"), 5e-5, 0.01
MAX_LENGTH = 512


def add_reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reference-pad",
        default="longest",
        help="reference padding: 'longest' (longest prompt of the slice) or a token count",
    )
    p.add_argument(
        "--reference-precision",
        default=None,
        choices=["same", "fp32", "both"],
        help="precision of the plain-PEFT reference: 'same' as ours (autocast in our half dtype), "
        "'fp32', or 'both' (the default when ours runs in a half precision; the headline ratio "
        "is like against like, so 'same' saves the fp32 run when short of time)",
    )
    p.add_argument("--skip-reference", action="store_true")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--demo-rss",
        action="store_true",
        help="also run `loraens train --config configs/demo.yaml` once per precision, each in "
        "its own process, and report its wall time and peak RSS",
    )
    p.add_argument("--demo-config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument(
        "--demo-override",
        default="",
        help="extra `loraens train` flags for --demo-rss, as one string: "
        "--demo-override='--optim.epochs 1 --data.eval_limit 50'",
    )
    p.add_argument("--demo-child", default=None, help=argparse.SUPPRESS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or 'smollm2-135m'")
    p.add_argument("--task", default="arce", choices=sorted(TASKS))
    p.add_argument("--members", type=int, default=5, help="ensemble size M")
    p.add_argument("--train-questions", type=int, default=48, help="one epoch over this many")
    p.add_argument("--eval-questions", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None, help="default: the paper's per task")
    p.add_argument("--eval-batch-size", type=int, default=32, help="questions per eval pass")
    p.add_argument(
        "--precision",
        default="auto",
        help="auto, fp32, bf16, fp16, or several side by side (e.g. fp32,bf16), each against "
        "the reference in its own precision (see --reference-precision)",
    )
    p.add_argument("--packing", default="on", choices=["on", "off"], help="ours: runtime.packing")
    p.add_argument("--pack-tokens", type=int, default=256, help="ours: runtime.pack_tokens")
    p.add_argument(
        "--memory-budget-gb", type=float, default=None, help="ours: runtime.memory_budget_gb"
    )
    add_demo_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_reference_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="time this many more epochs of our training, each just after a sustained matmul "
        "measurement, and report the median and range of useful FLOP/s over that rate and over "
        "the run's best peak (on a shared VM the matmul rate moves by ±25%% within minutes)",
    )
    p.add_argument(
        "--repeat-peak-seconds",
        type=float,
        default=30.0,
        help="length of the sustained matmul measurement before each repeated epoch",
    )
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--rss-members", default="1,20", help="ensemble sizes for peak memory")
    p.add_argument("--rss-batch-size", type=int, default=2, help="questions per member per step")
    p.add_argument("--rss-steps", type=int, default=2)
    p.add_argument(
        "--profile",
        default="auto",
        choices=["auto", "on", "off"],
        help="profile our timed training epoch; auto: report it when below 70%% of the matmul peak",
    )
    p.add_argument("--json", type=Path, default=None, help="default bench/results/<timestamp>")
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--members-per-pass", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    bad = [x for x in args.precisions if x not in ("auto", "fp32", "bf16", "fp16")]
    if bad or not args.precisions:
        p.error(f"--precision takes auto, fp32, bf16, fp16 separated by commas; got {bad}")
    args.precision = args.precisions[0]  # what the memory subprocesses use
    if args.reference_pad != "longest" and not args.reference_pad.isdigit():
        p.error("--reference-pad must be 'longest' or a positive integer")
    return args


# ---------------------------------------------------------------------------------------------
# Timing, environment, peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_STARTED = time.perf_counter()


def note(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timer(device: torch.device, out: dict, key: str, label: str):
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    out[key] = time.perf_counter() - start
    out[f"{key}_load_avg_1min"] = os.getloadavg()[0]  # others' work during the phase
    note(f"{label}: {out[key]:.1f} s (load average {out[f'{key}_load_avg_1min']:.2f})")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "git_commit": git_commit(),
        "load_average_at_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def matmul_peak(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int) -> float:
    """Best FLOP/s of repeated (m×k)@(k×n) matmuls in ``dtype`` over a few trials."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    flops = 2 * m * k * n
    repeats = max(1, min(20, int(2e10 // flops)))  # ~0.1-0.3 s per trial on this CPU
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats * (50 if device.type == "cuda" else 1)):
            torch.matmul(a, b)
        sync(device)
        elapsed = time.perf_counter() - start
        best = max(best, flops * repeats * (50 if device.type == "cuda" else 1) / elapsed)
    return best


ALL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_dtypes(device: torch.device) -> list[str]:
    """Dtypes the hardware computes matmuls in natively: on a CPU without AVX512-BF16 or AMX,
    bf16 is emulated (measuring its peak takes minutes to report a tiny number)."""
    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"]
    return ["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"]


def measure_peaks(device: torch.device, shape: ModelShape, rows: int, names: list[str]) -> dict:
    """Matmul peaks of the dtypes ``names`` (the native ones plus any a loop computes in)."""
    size = 2048 if device.type == "cpu" else 8192
    dtypes = {name: ALL_DTYPES[name] for name in names}
    square = {name: matmul_peak(device, dt, size, size, size) for name, dt in dtypes.items()}
    # The model's own largest matmul (MLP up-projection over one stacked batch), for context.
    tokens = min(max(rows, 256), 8192)
    mlp = {
        name: matmul_peak(device, dt, tokens, shape.hidden, shape.intermediate)
        for name, dt in dtypes.items()
    }
    return {
        "square_size": size,
        "square_flops": square,
        "mlp_shape": [tokens, shape.hidden, shape.intermediate],
        "mlp_shape_flops": mlp,
    }


# ---------------------------------------------------------------------------------------------
# FLOP accounting


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    attn_dim: int
    vocab: int
    linear_params: int  # every nn.Linear weight in the decoder layers
    lora_params: int  # one member: rank * (in + out) over the wrapped projections

    @classmethod
    def of(cls, model: nn.Module, rank: int, targets: tuple[str, ...]) -> ModelShape:
        """Read the shapes from an unwrapped model (before PEFT or loraens replace layers)."""
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        linear = lora = 0
        for name, module in model.get_decoder().layers.named_modules():
            if isinstance(module, nn.Linear):
                linear += module.in_features * module.out_features
                if name.rsplit(".", 1)[-1] in targets:
                    lora += rank * (module.in_features + module.out_features)
        return cls(
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            intermediate=getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
            attn_dim=heads * head_dim,
            vocab=model.get_output_embeddings().weight.shape[0],
            linear_params=linear,
            lora_params=lora,
        )

    def decoder(self, n: int, seq: int, training: bool) -> float:
        """Matmul FLOPs of ``n`` tokens through the decoder at sequence length ``seq``."""
        lin, lora, attn = 2 * self.linear_params, 2 * self.lora_params, 4 * seq * self.attn_dim
        if training:
            lin, lora, attn = 2 * lin, 3 * lora, 3 * attn
        return n * (lin + lora + self.layers * attn)

    def head(self, positions: int, columns: int, training: bool) -> float:
        return positions * 2 * self.hidden * columns * (2 if training else 1)


def pass_flops(
    shape: ModelShape, lengths: list[int], padded: int | None, training: bool, head: str, k: int
) -> float:
    """FLOPs of one forward(+backward) over rows of ``lengths`` padded to ``padded``.

    ``padded`` None: each row at its own length (the useful count). ``head``: 'answer' (full
    vocabulary at the answer position, training), 'labels' (K label rows at the answer position),
    'all' (full vocabulary at every position: the reference).
    """
    total = 0.0
    for length in lengths:
        seq = padded or length
        total += shape.decoder(seq, seq, training)
        if head == "all":
            total += shape.head(seq, shape.vocab, training)
        elif head == "answer":
            total += shape.head(1, shape.vocab, training)
        else:
            total += shape.head(1, k, training)
    return total


def rows_flops(
    shape: ModelShape, rows: int, width: int, questions: int, training: bool, head: str, k: int
) -> float:
    """FLOPs of a pass of ``rows`` rows of ``width`` tokens (packed or padded: attention is
    computed over the whole row either way) holding ``questions`` answer positions."""
    columns = shape.vocab if head == "answer" else k
    return rows * shape.decoder(width, width, training) + shape.head(questions, columns, training)


def useful_flops(shape: ModelShape, lengths: list[int], members: int, training: bool, k: int):
    head = "answer" if training else "labels"
    return members * pass_flops(shape, lengths, None, training, head, k)


# ---------------------------------------------------------------------------------------------
# Data


def subset(encoded: EncodedQuestions, indices) -> EncodedQuestions:
    indices = [int(i) for i in indices]
    return EncodedQuestions(
        input_ids=[encoded.input_ids[i] for i in indices],
        n_choices=[encoded.n_choices[i] for i in indices],
        labels=[encoded.labels[i] for i in indices],
        n_shortened=0,
    )


def load_data(args, tokenizer, n_train: int, n_eval: int):
    train_qs, eval_qs = load_task(args.task)
    train_qs = random.Random(args.seed).sample(train_qs, min(n_train, len(train_qs)))
    eval_qs = random.Random(args.seed + 1).sample(eval_qs, min(n_eval, len(eval_qs)))
    max_choices = max(len(q.choices) for q in train_qs + eval_qs)
    label_ids = torch.tensor(label_token_ids(tokenizer, max_choices))
    return (
        encode_questions(tokenizer, train_qs, MAX_LENGTH),
        encode_questions(tokenizer, eval_qs, MAX_LENGTH),
        label_ids,
    )


def full_split_padding(args, tokenizer, runtime: Runtime) -> dict:
    """Processed / useful tokens over the task's whole splits, for both loops (no model run).

    Length grouping works on groups of 8 batches, so a benchmark slice of a few batches gains
    nothing from it; this shows the padding a real epoch (and a full evaluation) carries, with
    ours laid out as ``runtime`` lays it out (packed or not; before any split into passes to
    fit the memory budget, which can only shorten rows).
    """
    train_qs, eval_qs = load_task(args.task)
    train = [len(ids) for ids in encode_questions(tokenizer, train_qs, MAX_LENGTH).input_ids]
    evals = [len(ids) for ids in encode_questions(tokenizer, eval_qs, MAX_LENGTH).input_ids]
    bs, m = args.batch_size, args.members
    orders = [
        epoch_order(train, bs, seed, 0, schedule_seed(args.seed))
        for seed in member_seeds(args.seed, m, "data")
    ]
    processed = 0
    for step in range(len(orders[0])):
        layout = plan_rows([order[step] for order in orders], train, runtime.row_tokens)
        width = max(sum(train[i] for i in row) for rows in layout for row in rows)
        processed += m * len(layout[0]) * width
    by_length = np.argsort([-n for n in evals], kind="stable")
    eval_processed = 0
    for i in range(0, len(evals), args.eval_batch_size):
        rows = plan_rows([by_length[i : i + args.eval_batch_size]], evals, runtime.row_tokens)[0]
        eval_processed += len(rows) * max(sum(evals[j] for j in row) for row in rows)
    return {
        "train_questions": len(train),
        "eval_questions": len(evals),
        "train": {"ours": processed / (m * sum(train)), "reference": max(train) / np.mean(train)},
        "infer": {"ours": eval_processed / sum(evals), "reference": max(evals) / np.mean(evals)},
    }


def pad_rows(encoded: EncodedQuestions, indices, length: int, pad_id: int):
    """Right-padded ids, attention mask and prompt lengths at a fixed ``length``."""
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    lengths = []
    for row, i in enumerate(indices):
        tokens = encoded.input_ids[int(i)][:length]
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        lengths.append(len(tokens))
    return ids, mask, torch.tensor(lengths)


# ---------------------------------------------------------------------------------------------
# Reference: plain PEFT, one member after the other


def reference_pad_length(args, encoded: EncodedQuestions) -> int:
    longest = max(len(ids) for ids in encoded.input_ids)
    if args.reference_pad == "longest":
        return longest
    return max(int(args.reference_pad), longest)  # never truncate the answer position away


def default_reference_precision(ours: list[str]) -> str:
    """Both when ours computes in a half dtype (``ours``: the dtypes of our precisions), else
    fp32 (then the same as ours)."""
    return "both" if any(dtype != "fp32" for dtype in ours) else "fp32"


def reference_dtypes(choice: str, ours: list[str]) -> list[str]:
    """Dtypes the reference runs in for ``--reference-precision`` ``choice``, like-against-like
    ones first; ``ours``: the dtypes our precisions compute in."""
    same = list(dict.fromkeys(ours))
    if choice == "fp32":
        return ["fp32"]
    if choice == "same":
        return same
    return list(dict.fromkeys([*same, "fp32"]))


def compared_references(ours_dtype: str, references: dict) -> list[str]:
    """Reference dtypes one precision of ours is compared with, the headline first: its own
    dtype (like against like) when that reference ran, then fp32."""
    return [name for name in dict.fromkeys([ours_dtype, "fp32"]) if name in references]


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=list(TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def reference_autocast(device: torch.device, dtype: str):
    """The one line a user adds for mixed precision around forward and loss; weights, their
    gradients and AdamW stay fp32, as under ours."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=ALL_DTYPES[dtype])


def run_reference(args, base, shape, train_set, eval_set, label_ids, device, dtype="fp32"):
    """The plain PEFT loop in ``dtype`` ('fp32', or a half dtype under autocast). Returns the raw
    figures, and the base model, unwrapped, under '_base_model'."""
    from peft import get_peft_model

    pad_id = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
    torch.manual_seed(member_seeds(args.seed, args.members, "init")[0])
    model = get_peft_model(base.model, lora_config(), adapter_name="warmup")
    out: dict = {"dtype": dtype}
    out.update(reference_training(args, model, shape, train_set, label_ids, pad_id, device, dtype))
    out.update(reference_inference(args, model, shape, eval_set, label_ids, pad_id, device, dtype))
    out["_base_model"] = model.unload()  # the same base weights, LoRA layers removed
    return out


def reference_training(args, model, shape, train_set, label_ids, pad_id, device, dtype):
    m_count, bs = args.members, args.batch_size
    init_seeds = member_seeds(args.seed, m_count, "init")
    data_seeds = member_seeds(args.seed, m_count, "data")
    labels_train = label_ids.to(device)[torch.tensor(train_set.labels)]
    train_len = reference_pad_length(args, train_set)
    lengths = [len(ids) for ids in train_set.input_ids]

    def train_member(name: str, batches) -> list[float]:
        model.set_adapter(name)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        losses = []
        for batch in batches:
            ids, mask, lens = pad_rows(train_set, batch, train_len, pad_id)
            ids, mask, lens = ids.to(device), mask.to(device), lens.to(device)
            with reference_autocast(device, dtype):
                logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
                answer = logits[torch.arange(len(batch), device=device), lens - 1]
                loss = F.cross_entropy(answer, labels_train[torch.as_tensor(batch, device=device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    # Warm-up: one step of a throw-away adapter.
    train_member("warmup", [np.arange(min(bs, len(train_set)))])
    out: dict = {"pad_length_train": train_len}
    losses = []
    with timer(device, out, "train_seconds", f"reference training ({dtype})"):
        for m in range(m_count):
            torch.manual_seed(init_seeds[m])  # PEFT draws lora_A from the global generator
            model.add_adapter(f"m{m}", lora_config())
            order = epoch_order(lengths, bs, data_seeds[m], 0, None)  # a plain shuffle
            losses += train_member(f"m{m}", order)
    model.delete_adapter("warmup")
    out["train_steps_per_member"] = -(-len(train_set) // bs)
    out["train_mean_loss"] = float(np.mean(losses))
    out["train_useful_tokens"] = m_count * sum(lengths)
    out["train_processed_tokens"] = m_count * len(train_set) * train_len
    out["train_flops"] = m_count * pass_flops(shape, lengths, train_len, True, "all", 0)
    return out


def reference_inference(args, model, shape, eval_set, label_ids, pad_id, device, dtype):
    """Switch adapters, full logits at every position, label logits at the answer."""
    m_count = args.members
    eval_len = reference_pad_length(args, eval_set)
    k = len(label_ids)
    eval_lengths = [len(ids) for ids in eval_set.input_ids]
    chunks = [np.arange(i, min(i + args.eval_batch_size, len(eval_set))) for i in
              range(0, len(eval_set), args.eval_batch_size)]  # fmt: skip
    model.eval()
    label_dev = label_ids.to(device)

    def score(name: str, batches) -> np.ndarray:
        model.set_adapter(name)
        scores = []
        with torch.no_grad(), reference_autocast(device, dtype):
            for batch in batches:
                ids, mask, lens = pad_rows(eval_set, batch, eval_len, pad_id)
                ids, mask, lens = ids.to(device), mask.to(device), lens.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                answer = logits[torch.arange(len(batch), device=device), lens - 1]
                scores.append(answer[:, label_dev].float().cpu().numpy())
        return np.concatenate(scores)

    score("m0", chunks[:1])  # warm-up
    out: dict = {}
    with timer(device, out, "infer_seconds", f"reference inference ({dtype})"):
        for m in range(m_count):
            score(f"m{m}", chunks)
    out["pad_length_eval"] = eval_len
    out["infer_useful_tokens"] = m_count * sum(eval_lengths)
    out["infer_processed_tokens"] = m_count * len(eval_set) * eval_len
    out["infer_flops"] = m_count * pass_flops(shape, eval_lengths, eval_len, False, "all", k)
    return out


# ---------------------------------------------------------------------------------------------
# Ours: loraens as shipped


def build_ours(model, args, runtime: Runtime, members: int) -> LoRAEnsemble:
    ensemble = LoRAEnsemble(model, members, RANK, ALPHA, 0.0, TARGETS).to(runtime.device)
    ensemble.init_members(member_seeds(args.seed, members, "init"))
    return ensemble


def make_trainer(ensemble, args, runtime, train_set, label_ids, members, members_per_pass=None):
    return EnsembleTrainer(
        ensemble,
        build_optimizer(ensemble, OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY)),
        train_set,
        label_ids,
        runtime,
        data_seeds=member_seeds(args.seed, members, "data"),
        batch_size=args.batch_size,
        schedule_seed=schedule_seed(args.seed),
        members_per_pass=members_per_pass,
    )


def ours_eval_passes(
    encoded: EncodedQuestions, batch_size: int, members: int, runtime: Runtime
) -> list[tuple[int, int, int]]:
    """(rows, row length, questions) of every pass of ``score_members``, rebuilt the same way
    (longest first, each batch laid out once and replicated per member)."""
    lengths = [len(ids) for ids in encoded.input_ids]
    order = np.argsort([-n for n in lengths], kind="stable")
    passes = []
    for i in range(0, len(order), batch_size):
        batch = order[i : i + batch_size]
        rows = plan_rows([batch], lengths, runtime.row_tokens)[0]
        width = max(sum(lengths[j] for j in row) for row in rows)
        passes.append((len(rows) * members, width, len(batch) * members))
    return passes


def run_ours(args, base, shape, train_set, eval_set, label_ids, runtime) -> dict:
    device, m_count, bs = runtime.device, args.members, args.batch_size
    label_ids = label_ids.to(device)
    # As shipped (model.dtype auto): the decoder's linear weights held in the compute dtype.
    # The fp32 tensors are kept aside, so the next loop gets the base exactly as loaded.
    held = matmul_weights(base.model)
    as_loaded = [p.data for p in held]
    cast_parameters(held, resolve_matmul_dtype("auto", runtime))
    ensemble = build_ours(base.model, args, runtime, m_count)
    # Warm-up: one step on a one-batch slice, then reset the members and use a fresh optimiser.
    warm = make_trainer(ensemble, args, runtime, subset(train_set, range(bs)), label_ids, m_count)
    warm.train_epoch(0)
    ensemble.init_members(member_seeds(args.seed, m_count, "init"))
    trainer = make_trainer(ensemble, args, runtime, train_set, label_ids, m_count)
    trainer.pass_log = []
    out: dict = {}
    # The profiler (if on) records the timed epoch itself: a few µs per op against ops of
    # milliseconds, so it costs well under 1% and saves a separate, equally long profiled step.
    profiler = make_profiler(runtime) if args.profile != "off" else contextlib.nullcontext()
    with timer(device, out, "train_seconds", "ours training"), profiler as prof:
        losses = trainer.train_epoch(0)
    if prof is not None:
        out["_profile"] = summarize_profile(
            prof, trainer.steps_per_epoch(), runtime.device.type == "cuda"
        )
    passes = trainer.pass_log
    out["train_steps_per_member"] = trainer.steps_per_epoch()
    out["train_mean_loss"] = float(np.mean(losses))
    out["train_useful_tokens"] = trainer.tokens_seen
    out["train_processed_tokens"] = trainer.tokens_processed
    assert trainer.tokens_processed == sum(rows * width for rows, width, _ in passes)
    out["train_flops"] = sum(rows_flops(shape, rows, width, len(q), True, "answer", 0)
                             for rows, width, q in passes)  # fmt: skip
    out["train_passes_per_step"] = len(passes) / trainer.steps_per_epoch()
    out["train_rows_per_pass"] = max(rows for rows, _, _ in passes)
    out["train_tokens_per_pass"] = max(rows * width for rows, width, _ in passes)
    out["train_repeats"] = repeat_training(args, ensemble, runtime, train_set, label_ids)

    k = len(label_ids)
    score_members(ensemble, subset(eval_set, range(args.eval_batch_size)), label_ids, runtime,
                  batch_size=args.eval_batch_size)  # fmt: skip
    with timer(device, out, "infer_seconds", "ours inference"):
        score_members(ensemble, eval_set, label_ids, runtime, batch_size=args.eval_batch_size)
    passes = ours_eval_passes(eval_set, args.eval_batch_size, m_count, runtime)
    out["infer_useful_tokens"] = m_count * sum(len(ids) for ids in eval_set.input_ids)
    out["infer_processed_tokens"] = sum(rows * width for rows, width, _ in passes)
    out["infer_flops"] = sum(rows_flops(shape, rows, width, q, False, "labels", k)
                             for rows, width, q in passes)  # fmt: skip
    out["dtype"] = dtype_name(runtime.autocast_dtype)
    unwrap(ensemble)  # the base model as it was, for the next precision
    for param, data in zip(held, as_loaded, strict=True):
        param.data = data
    return out


def sustained_matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """Mean FLOP/s of back-to-back square matmuls for ``seconds``: the rate the machine gives
    over a window as long as a timed epoch, where a shared VM's bursts average out (short
    trials of :func:`matmul_peak` range over ±25% from one second to the next on one)."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)
    sync(device)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        calls += 1
        if device.type == "cuda" and calls % 50 == 0:
            sync(device)
    sync(device)
    return 2 * size**3 * calls / (time.perf_counter() - start)


def repeat_training(args, ensemble, runtime, train_set, label_ids) -> list[dict]:
    """``--repeats`` more timed epochs of our training, each from fresh members and just after
    ``--repeat-peak-seconds`` of square matmuls in the loop's dtype, so that every epoch can be
    divided by a matmul rate measured over a similar window under the same load."""
    dtype = runtime.autocast_dtype or torch.float32
    repeats = []
    for _ in range(args.repeats):
        rate = sustained_matmul_rate(runtime.device, dtype, args.repeat_peak_seconds)
        ensemble.init_members(member_seeds(args.seed, args.members, "init"))
        trainer = make_trainer(ensemble, args, runtime, train_set, label_ids, args.members)
        out: dict = {}
        with timer(runtime.device, out, "seconds", "ours training, repeated"):
            trainer.train_epoch(0)
        repeats.append({"seconds": out["seconds"], "sustained_matmul_flops_per_s": rate})
    return repeats


def repeat_summary(repeats: list[dict], useful: float, best_peak: float) -> dict:
    """Useful FLOP/s of every repeated epoch over the sustained matmul rate measured just
    before it and over the run's best matmul peak: median and range of each."""
    useful_rates = [useful / r["seconds"] for r in repeats]
    adjacent = [
        u / r["sustained_matmul_flops_per_s"] for u, r in zip(useful_rates, repeats, strict=True)
    ]
    of_best = [u / best_peak for u in useful_rates]
    return {
        "epochs": len(repeats),
        "seconds": [r["seconds"] for r in repeats],
        "sustained_matmul_flops_per_s": [r["sustained_matmul_flops_per_s"] for r in repeats],
        "useful_flops_per_s": useful_rates,
        "useful_fraction_of_sustained_rate": adjacent,
        "sustained_median": float(np.median(adjacent)),
        "sustained_min": min(adjacent),
        "sustained_max": max(adjacent),
        "best_peak_flops_per_s": best_peak,
        "useful_fraction_of_best_peak": of_best,
        "best_peak_median": float(np.median(of_best)),
        "best_peak_min": min(of_best),
        "best_peak_max": max(of_best),
    }


def unwrap(ensemble: LoRAEnsemble) -> None:
    """Put the base model's own projections back in place of the LoRA layers."""
    model = ensemble.model
    for name, layer in ensemble.lora_layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)


def dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def make_profiler(runtime: Runtime):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if runtime.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities)


# Ops whose time is matmul work the FLOP count covers; everything else is overhead around it.
MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product", "aten::baddbmm")  # fmt: skip
CAST_OPS = ("aten::copy_", "aten::to", "aten::_to_copy")


def summarize_profile(prof, steps: int, cuda: bool, rows: int = 15) -> dict:
    """Top ops by self time per training step, and the matmul / cast / other split."""
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    split = {"matmul": 0.0, "dtype casts (copy_)": 0.0, "other": 0.0}
    for e in events:
        if e.key.startswith(MATMUL_OPS):
            split["matmul"] += getattr(e, key)
        elif e.key in CAST_OPS:
            split["dtype casts (copy_)"] += getattr(e, key)
        else:
            split["other"] += getattr(e, key)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return {
        "sorted_by": key,
        "steps": steps,
        "ms_per_step": total / 1e3 / steps,
        "split": {name: value / total for name, value in split.items()},
        "ops": [
            {
                "op": e.key,
                "ms_per_step": getattr(e, key) / 1e3 / steps,
                "share": getattr(e, key) / total,
                "calls_per_step": e.count / steps,
            }
            for e in top
        ],  # fmt: skip
    }


# ---------------------------------------------------------------------------------------------
# Peak memory, one subprocess per ensemble size


def _proc_status_mb(field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory.

    VmHWM first: ``ru_maxrss`` survives ``execve`` (Linux folds the old address space's peak
    into it), so in a subprocess started from a big parent it reports the parent's size.
    """
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else float("nan")


def ours_runtime(args, precision: str) -> Runtime:
    return resolve_runtime(
        args.device,
        precision,
        packing=args.packing == "on",
        pack_tokens=args.pack_tokens,
        memory_budget_gb=args.memory_budget_gb,
    )


def rss_child(args) -> None:
    runtime = ours_runtime(args, args.precision)
    base = load_base_model(args.model, device=runtime.device)
    hold_matmul_weights_in(base.model, resolve_matmul_dtype("auto", runtime))  # as shipped
    bs = args.rss_batch_size
    train_set, _, label_ids = load_data(args, base.tokenizer, bs * args.rss_steps, 1)
    args.batch_size = bs
    after_load = current_rss_mb()
    ensemble = build_ours(base.model, args, runtime, args.members)
    trainer = make_trainer(ensemble, args, runtime, train_set, label_ids.to(runtime.device),
                           args.members, args.members_per_pass)  # fmt: skip
    start = time.perf_counter()
    trainer.train_epoch(0)
    sync(runtime.device)
    result = {
        "members": args.members,
        "members_per_pass": args.members_per_pass,
        "steps": trainer.steps_per_epoch(),
        "questions_per_member_per_step": bs,
        "rss_after_load_mb": after_load,
        "peak_rss_mb": peak_rss_mb(),
        "lora_state_mb": sum(
            p.numel() * p.element_size() for p in ensemble.parameters() if p.requires_grad
        )
        / 2**20,  # fmt: skip
        "seconds": time.perf_counter() - start,
    }
    if runtime.device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(runtime.device) / 2**20
    print(json.dumps(result))


def run_memory(args) -> list[dict]:
    results = []
    for members in [int(m) for m in args.rss_members.split(",") if m]:
        cmd = [
            sys.executable, __file__, "--rss-child", "--members", str(members),
            "--members-per-pass", "1", "--model", args.model, "--task", args.task,
            "--precision", args.precision, "--device", args.device, "--seed", str(args.seed),
            "--rss-batch-size", str(args.rss_batch_size), "--rss-steps", str(args.rss_steps),
            "--packing", args.packing, "--pack-tokens", str(args.pack_tokens),
        ]  # fmt: skip
        if args.memory_budget_gb is not None:
            cmd += ["--memory-budget-gb", str(args.memory_budget_gb)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"memory subprocess for M={members} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def demo_child(args) -> None:
    """Run `loraens train` on the demo config in this (fresh) process; print time and peak."""
    from loraens.cli.main import main as cli

    precision, out = args.demo_child.split(":", 1)
    start = time.perf_counter()
    flags = ["--runtime.precision", precision, "--runtime.progress", "false"]
    flags += shlex.split(args.demo_override)
    cli(["train", "--config", str(args.demo_config), "--out", out, *flags])
    result = {
        "precision": precision,
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": peak_rss_mb(),
        "summary": json.loads((Path(out) / "summary.json").read_text()),
    }
    print(json.dumps(result))


def run_demo(args) -> list[dict]:
    """The demo's wall time and peak RSS (VmHWM of its own process), once per precision."""
    import tempfile

    results = []
    for precision in args.precisions:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--demo-child", f"{precision}:{tmp}/run",
                   "--demo-config", str(args.demo_config),
                   f"--demo-override={args.demo_override}"]  # fmt: skip
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            note(f"demo run, precision {precision}")
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"demo run ({precision}) failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        note(f"demo {precision}: {result['wall_seconds']:.0f} s, peak RSS "
             f"{result['peak_rss_mb']:.0f} MB")  # fmt: skip
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------
# Report


def summarize(raw: dict, shape: ModelShape, peaks: dict, phase: str, lengths, members, k) -> dict:
    seconds = raw[f"{phase}_seconds"]
    useful_tok, processed_tok = raw[f"{phase}_useful_tokens"], raw[f"{phase}_processed_tokens"]
    flops = raw[f"{phase}_flops"]
    useful = useful_flops(shape, lengths, members, phase == "train", k)
    peak = peaks["square_flops"][raw["dtype"]]
    return {
        "seconds": seconds,
        "load_avg_1min_after": raw[f"{phase}_seconds_load_avg_1min"],
        "dtype": raw["dtype"],
        "useful_tokens": useful_tok,
        "processed_tokens": processed_tok,
        "useful_tokens_per_s": useful_tok / seconds,
        "processed_tokens_per_s": processed_tok / seconds,
        "padding_overhead": processed_tok / useful_tok,
        "flops": flops,
        "useful_flops": useful,
        "flops_per_useful_token": flops / useful_tok,
        "flops_per_processed_token": flops / processed_tok,
        "achieved_flops_per_s": flops / seconds,
        "useful_flops_per_s": useful / seconds,
        "peak_flops_per_s": peak,
        "achieved_fraction_of_peak": flops / seconds / peak,
        "useful_fraction_of_peak": useful / seconds / peak,
    }


def phase_tables(references: dict, section: dict, precision: str, width: int) -> list[str]:
    """Training and inference tables of one precision of ours against ``references`` ({dtype:
    reference section}, the headline, like against like, first)."""
    lines: list[str] = []
    for phase in ("train", "infer"):
        refs = {name: ref[phase] for name, ref in references.items()}
        lines += phase_table(phase, refs, section[phase], precision, width)
        if phase == "train":
            lines += training_notes(section)
    return lines


def phase_table(phase: str, refs: dict, ours: dict, precision: str, width: int) -> list[str]:
    """One table: ours, then each reference followed by ours / that reference."""
    title = f"{'TRAINING' if phase == 'train' else 'INFERENCE'} (ours: {precision})"
    lines = ["", f"{title:<{width}}{'ours':>14}"
             + "".join(f"{'ref ' + name:>14}{'ours/ref':>10}" for name in refs)]  # fmt: skip

    def row(label, key, fmt, ratio=True, scale=1.0):
        o = ours[key] * scale
        cells = f"{o:>14{fmt}}"
        for ref in refs.values():
            r = ref[key] * scale
            cells += f"{r:>14{fmt}}" + (f"{o / r:>10.2f}" if ratio and r else f"{'':>10}")
        lines.append(f"  {label:<{width - 2}}{cells}".rstrip())

    dtypes = "".join(f"{ref['dtype']:>14}{'':>10}" for ref in refs.values())
    lines.append(f"  {'dtype':<{width - 2}}{ours['dtype']:>14}{dtypes}".rstrip())
    row("wall time (s)", "seconds", ".1f")
    row("load average (1 min) at end", "load_avg_1min_after", ".2f", ratio=False)
    row("useful tokens/s", "useful_tokens_per_s", ".0f")
    row("processed tokens/s (incl. pad)", "processed_tokens_per_s", ".0f")
    row("processed / useful tokens", "padding_overhead", ".2f", ratio=False)
    row("GFLOP per useful token", "flops_per_useful_token", ".3f", scale=1e-9)
    row("GFLOP per processed token", "flops_per_processed_token", ".3f", scale=1e-9)
    row("achieved GFLOP/s", "achieved_flops_per_s", ".1f", scale=1e-9)
    row("  fraction of peak (own dtype)", "achieved_fraction_of_peak", ".1%", ratio=False)
    row("useful GFLOP/s", "useful_flops_per_s", ".1f", scale=1e-9)
    row("  fraction of peak (own dtype)", "useful_fraction_of_peak", ".1%", ratio=False)
    if phase == "train":
        row("mean training loss (sanity)", "mean_loss", ".3f", ratio=False)
    return lines


def training_notes(section: dict) -> list[str]:
    details = section["details"]
    lines = [f"  ours: {details['train_passes_per_step']:.1f} passes per step, at most "
             f"{details['train_tokens_per_pass']} tokens per pass"]  # fmt: skip
    if "train_repeats" in section:
        rep = section["train_repeats"]
        lines.append(
            f"  ours, {rep['epochs']} more epochs: useful FLOP/s over the "
            f"sustained matmul rate just before: median {rep['sustained_median']:.1%} "
            f"({rep['sustained_min']:.1%}–{rep['sustained_max']:.1%}); over the best "
            f"peak: median {rep['best_peak_median']:.1%} "
            f"({rep['best_peak_min']:.1%}–{rep['best_peak_max']:.1%})"
        )
    return lines


def speedup_lines(result: dict) -> list[str]:
    """The headline: useful tokens/s of ours over each reference, like against like first."""
    if not result.get("ours_over_reference"):
        return []
    lines = ["", "SPEED-UP: useful tokens/s, ours / reference (like against like first)"]
    for precision, phases in result["ours_over_reference"].items():
        dtype = result["ours_by_precision"][precision]["train"]["dtype"]
        name = precision if precision == dtype else f"{precision} ({dtype})"
        parts = []
        for phase, label in (("train", "training"), ("infer", "inference")):
            by_ref = phases[phase]["useful_tokens_per_s_by_reference"]
            parts.append(f"{label} " + ", ".join(f"{ratio:.2f}× the {ref} reference"
                                                 for ref, ratio in by_ref.items()))  # fmt: skip
        lines.append(f"  ours {name}: " + "; ".join(parts))
    return lines


def header_lines(result: dict) -> list[str]:
    cfg, env, lines = result["config"], result["environment"], []
    lines.append(
        f"loraens throughput — {cfg['model']} on {cfg['task']}, M={cfg['members']}, "
        f"{cfg['train_questions']} train q × 1 epoch (batch {cfg['batch_size']}), "
        f"{cfg['eval_questions']} eval q (batch {cfg['eval_batch_size']})"
    )
    lines.append(
        f"{env['cpu']} · {env['threads']} threads · {env['device']} · torch {env['torch']} · "
        f"load avg at start {env['load_average_at_start'][0]:.2f}"
    )
    peaks = result["peak"]
    sq = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks["square_flops"].items())
    mlp = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks["mlp_shape_flops"].items())
    lines.append(
        f"matmul peak GFLOP/s (best of start and end): {peaks['square_size']}² {sq}; "
        f"model MLP shape {'×'.join(map(str, peaks['mlp_shape']))} {mlp}"
    )
    if "square_flops_at_end" in peaks:
        start, end = peaks["square_flops_at_start"], peaks["square_flops_at_end"]
        lines.append(
            f"  square peak at start {', '.join(f'{k} {v / 1e9:.0f}' for k, v in start.items())}"
            f"; at end {', '.join(f'{k} {v / 1e9:.0f}' for k, v in end.items())}"
            " (a big spread means other processes were competing for the cores)"
        )
    full = result["full_split_padding"]
    lines.append(
        f"processed/useful tokens over the full {cfg['task']} splits ({full['train_questions']} "
        f"train, {full['eval_questions']} eval; the slice here is too small for length "
        f"grouping): training ours {full['train']['ours']:.2f} vs reference "
        f"{full['train']['reference']:.2f}, inference ours {full['infer']['ours']:.2f} vs "
        f"reference {full['infer']['reference']:.2f}"
    )
    return lines


def memory_lines(memory: list[dict]) -> list[str]:
    lines = ["", "PEAK MEMORY of our training (own subprocess each, one member per pass)"]
    key = "cuda_max_allocated_mb" if "cuda_max_allocated_mb" in memory[0] else None
    for mem in memory:
        extra = f", CUDA max allocated {mem[key]:.0f} MB" if key else ""
        lines.append(
            f"  M={mem['members']:>3}: peak RSS {mem['peak_rss_mb']:7.0f} MB (after model "
            f"load {mem['rss_after_load_mb']:.0f} MB; LoRA weights {mem['lora_state_mb']:.1f}"
            f" MB){extra}; {mem['steps']} steps of {mem['questions_per_member_per_step']} "
            f"q/member"
        )
    if len(memory) >= 2:
        a, b = memory[0], memory[-1]
        per = (b["peak_rss_mb"] - a["peak_rss_mb"]) / max(b["members"] - a["members"], 1)
        lines.append(f"  → {per:.1f} MB per extra member (weights + grads + AdamW moments "
                     f"≈ 4× LoRA weights)")  # fmt: skip
    return lines


def demo_and_profile_lines(result: dict) -> list[str]:
    lines = []
    for demo in result.get("demo", []):
        table = demo["summary"]["table"]
        accuracy = ", ".join(f"{k} acc {v.get('accuracy', float('nan')):.3f}"
                             for k, v in table.items())  # fmt: skip
        lines.append(
            f"DEMO (--precision {demo['precision']}): {demo['wall_seconds']:.0f} s wall, peak RSS "
            f"{demo['peak_rss_mb']:.0f} MB; {accuracy}"
        )
    if result.get("profile"):
        prof = result["profile"]
        lines.append("")
        split = ", ".join(f"{name} {share:.0%}" for name, share in prof["split"].items())
        lines.append(
            f"PROFILE of our training, per step (mean of {prof['steps']}; by "
            f"{prof['sorted_by']}): {prof['ms_per_step']:.0f} ms — {split}"
        )
        for op in prof["ops"]:
            lines.append(
                f"  {op['op'][:56]:<56}{op['ms_per_step']:>9.0f} ms{op['share']:>7.1%}"
                f"{op['calls_per_step']:>8.0f} calls"
            )
    return lines


def format_report(result: dict) -> str:
    lines = header_lines(result) + speedup_lines(result)
    references = result.get("reference_by_precision", {})
    for precision, section in result["ours_by_precision"].items():
        names = compared_references(section["train"]["dtype"], references)
        compared = {name: references[name] for name in names}
        lines += phase_tables(compared, section, precision, width=34)
    if result.get("memory"):
        lines += memory_lines(result["memory"])
    lines += demo_and_profile_lines(result)
    lines.append("")
    lines.append(f"total wall time {result['wall_seconds']:.0f} s")
    return "\n".join(lines)


def jsonable(obj):
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def run_config(args, train_set, eval_set, reference_precisions: list[str]) -> dict:
    train_lengths = [len(ids) for ids in train_set.input_ids]
    eval_lengths = [len(ids) for ids in eval_set.input_ids]
    return {
        "model": args.model,
        "task": args.task,
        "members": args.members,
        "train_questions": len(train_set),
        "eval_questions": len(eval_set),
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "precision": args.precision,
        "precisions": args.precisions,
        "packing": args.packing,
        "pack_tokens": args.pack_tokens,
        "memory_budget_gb": args.memory_budget_gb,
        "reference_pad": args.reference_pad,
        "reference_precision": args.reference_precision,
        "reference_precisions": reference_precisions,  # what ran
        "seed": args.seed,
        "lora": {"rank": RANK, "alpha": ALPHA, "targets": list(TARGETS)},
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "train_prompt_tokens": {"mean": float(np.mean(train_lengths)), "max": max(train_lengths)},
        "eval_prompt_tokens": {"mean": float(np.mean(eval_lengths)), "max": max(eval_lengths)},
    }


def summarize_phases(raw: dict, shape, peaks, train_set, eval_set, members: int, k: int) -> dict:
    train_lengths = [len(ids) for ids in train_set.input_ids]
    eval_lengths = [len(ids) for ids in eval_set.input_ids]
    return {
        "train": {
            **summarize(raw, shape, peaks, "train", train_lengths, members, k),
            "mean_loss": raw["train_mean_loss"],
            "steps_per_member": raw["train_steps_per_member"],
        },
        "infer": summarize(raw, shape, peaks, "infer", eval_lengths, members, k),
        "details": {k: v for k, v in raw.items() if not k.startswith("_")},
    }


def run_loops(args, base, shape, data, runtimes: dict, ref_dtypes: list[str], phases):
    """Each reference, then ours once per precision, all on the one base model (each loop
    unwraps it again). Returns the references by dtype, ours by precision, and a profile."""
    train_set, eval_set, label_ids = data
    device = next(iter(runtimes.values())).device
    references = {}
    for dtype in ref_dtypes:
        note(f"reference, {dtype}")
        raw = run_reference(args, base, shape, train_set, eval_set, label_ids, device, dtype)
        base = dataclasses.replace(base, model=raw.pop("_base_model"))
        references[dtype] = phases(raw)
    ours, profile = {}, None
    for precision, rt in runtimes.items():
        note(f"ours, precision {precision} ({dtype_name(rt.autocast_dtype)})")
        raw = run_ours(args, base, shape, train_set, eval_set, label_ids, rt)
        profile = profile or raw.pop("_profile", None)
        ours[precision] = phases(raw)
    return references, ours, profile


def speedups(ours: dict, references: dict) -> dict:
    """Useful tokens/s of ours over each reference it is compared with, per precision and phase.
    'useful_tokens_per_s', the key older results hold, is the headline: like against like."""
    out: dict = {}
    for precision, section in ours.items():
        names = compared_references(section["train"]["dtype"], references)
        out[precision] = {}
        for phase in ("train", "infer"):
            mine = section[phase]["useful_tokens_per_s"]
            by_ref = {n: mine / references[n][phase]["useful_tokens_per_s"] for n in names}
            out[precision][phase] = {
                "useful_tokens_per_s": by_ref[names[0]],
                "reference_dtype": names[0],
                "useful_tokens_per_s_by_reference": by_ref,
            }
    return out


def merge_peaks(peaks: dict, again: dict) -> None:
    """Keep the best of the peaks measured at start and at end, and both for the record."""
    peaks["square_flops_at_start"] = dict(peaks["square_flops"])
    peaks["square_flops_at_end"] = again["square_flops"]
    for key in ("square_flops", "mlp_shape_flops"):
        for name, value in again[key].items():
            peaks[key][name] = max(peaks[key][name], value)


def refresh_fractions(result: dict, peaks: dict) -> None:
    """Fractions of peak over the final (best) peaks, each loop over its own dtype's."""
    sections = [*result["reference_by_precision"].values(), *result["ours_by_precision"].values()]
    for section in sections:
        for phase in ("train", "infer"):
            stats = section[phase]
            stats["peak_flops_per_s"] = peaks["square_flops"][stats["dtype"]]
            for kind in ("achieved", "useful"):
                stats[f"{kind}_fraction_of_peak"] = (
                    stats[f"{kind}_flops_per_s"] / stats["peak_flops_per_s"]
                )
    for section in result["ours_by_precision"].values():
        repeats = section["details"].get("train_repeats")
        if repeats:
            # A 30 s window can beat the short trials of the peak measured at start and end.
            best = max(
                peaks["square_flops"][section["train"]["dtype"]],
                *(r["sustained_matmul_flops_per_s"] for r in repeats),
            )
            useful = section["train"]["useful_flops"]
            section["train_repeats"] = repeat_summary(repeats, useful, best)


def write_json(args, result: dict) -> None:
    path = args.json
    if path is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = REPO / "bench" / "results" / f"throughput-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=2) + "\n")
    print(f"results written to {path}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = TASKS[args.task].paper_batch_size
    if args.rss_child:
        rss_child(args)
        return {}
    if args.demo_child:
        demo_child(args)
        return {}
    started = time.perf_counter()
    runtimes = {precision: ours_runtime(args, precision) for precision in args.precisions}
    runtime = runtimes[args.precision]
    device = runtime.device
    ours_dtypes = [dtype_name(rt.autocast_dtype) for rt in runtimes.values()]
    args.reference_precision = args.reference_precision or default_reference_precision(ours_dtypes)
    ref_dtypes = (
        [] if args.skip_reference else reference_dtypes(args.reference_precision, ours_dtypes)
    )
    dtypes = list(dict.fromkeys([*native_dtypes(device), *ours_dtypes, *ref_dtypes]))
    env = environment(device)
    base = load_base_model(args.model, device=device)
    shape = ModelShape.of(base.model, RANK, TARGETS)
    data = load_data(args, base.tokenizer, args.train_questions, args.eval_questions)
    train_set, eval_set, label_ids = data
    note(f"model and data loaded; measuring the matmul peak on {device}")
    peaks = measure_peaks(device, shape, args.members * args.batch_size * 64, dtypes)
    note(
        "peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks["square_flops"].items())
    )
    result: dict = {
        "config": run_config(args, train_set, eval_set, ref_dtypes),
        "environment": env,
        "full_split_padding": full_split_padding(args, base.tokenizer, runtime),
        "model_shape": shape.__dict__,
        "peak": peaks,
    }
    phases = functools.partial(
        summarize_phases,
        shape=shape,
        peaks=peaks,
        train_set=train_set,
        eval_set=eval_set,
        members=args.members,
        k=len(label_ids),
    )
    references, ours, profile = run_loops(args, base, shape, data, runtimes, ref_dtypes, phases)
    result["reference_by_precision"] = references
    result["ours_by_precision"] = ours
    result["ours"] = ours[args.precision]  # the first, as before
    if references:
        # "reference" and "ours_over_reference" keep their old meaning, the reference "ours" is
        # compared with; that is now the one in ours' own precision.
        headline = compared_references(result["ours"]["train"]["dtype"], references)[0]
        result["reference"] = references[headline]
        result["ours_over_reference"] = speedups(ours, references)
    del base
    gc.collect()
    if not args.skip_memory:
        note("peak memory subprocesses")
        result["memory"] = run_memory(args)
    # Other processes may share the machine: measure the peak again and keep the best of both.
    note("measuring the matmul peak again")
    merge_peaks(peaks, measure_peaks(device, shape, args.members * args.batch_size * 64, dtypes))
    if args.demo_rss:
        note("demo runs")
        result["demo"] = run_demo(args)
    refresh_fractions(result, peaks)
    fraction = result["ours"]["train"]["achieved_fraction_of_peak"]
    if profile is not None and (args.profile == "on" or fraction < 0.7):
        result["profile"] = profile
    result["environment"]["load_average_at_end"] = list(os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - started
    print(format_report(result))
    write_json(args, result)
    return result


if __name__ == "__main__":
    main()
