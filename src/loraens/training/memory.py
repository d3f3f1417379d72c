"""How many tokens a training pass may carry: a memory budget and an activation estimate.

Activations kept for backward dominate a step's memory (the base weights are shared, a member's
LoRA state is a few MB). Per token and decoder layer, HF Llama keeps q, k, v and the attention
output, the fp32 inputs of its two RMSNorms, the shared input of the LoRA A matrices and the
SwiGLU MLP's gate, up and silu(gate); frozen projections keep nothing. Counted with autograd's
saved-tensor hooks on a small Llama (h = 256, f = 640, 2 layers, 4 × 128 tokens; the method of
``bench/distributed_sizes.py --check``):

* fp32: 15.0 kB per token and layer measured, formula 28h + 12f = 14.8 kB;
* bf16 autocast: 18h + 6f B (docs/distributed.md, measured +2%).

Packed rows add 5% (their block-diagonal mask, per-row rotary tables). Backward's transient
workspace and the answer-position logits come on top; :data:`OVERHEAD` covers both. In half
precision the transients weigh more against the halved saved tensors (autocast casts each
projection's input on its own from the fp32 residual stream; oneDNN packs weights per call).
Peak RSS over one training pass of SmolLM2 in bf16 (packed answer-text rows of 256 positions,
passes of 192 to 1024 tokens, 2-core AMX Xeon, ``bench/pass_memory.py``) rose by 0.34 GB plus
0.94 MB per token: at the 1 GB budget's scale, 2.2 times the saved bytes per token, hence
:data:`HALF_OVERHEAD`. At fp32's 1.25 a bf16 pass overran its budget by half: all else
equal, ``make demo`` in bf16 peaked at 2.66 GB with 1.25 and at 2.23 GB with 2.2, 4 s slower
(/usr/bin/time -v, same machine). fp32 rose by 0.11 GB plus 1.48 MB per token; its passes are
left as they were, its demo peak (2.15 GB) already within the budget's purpose.

A step is then split into passes that each fit the budget: fewer rows of each member per pass
(gradient accumulation: every question's loss is divided by its member's full batch size, so
the passes sum to exactly the member's mean-loss gradient), and fewer members per pass only
when a single row of every member is already too much.
"""

from __future__ import annotations

from pathlib import Path

import torch

OVERHEAD = 1.25  # packed-mask share, backward's workspace, logits at the answer position
HALF_OVERHEAD = 2.2  # the same in bf16/fp16, where the transients weigh more (module doc)
GB = 1e9
# Measured (SmolLM2-135M, fp32, arce, M = 5, batch 16, packed): with a 1.5 GB budget (1157
# tokens per pass) peak RSS was 2.82 GB, 0.57 GB after loading; 1 GB leaves room under 3 GB.
CPU_CAP_GB = 1.0
CPU_FRACTION, CUDA_FRACTION = 0.25, 0.5


def activation_bytes_per_token(config, autocast_dtype: torch.dtype | None) -> float:
    """Bytes kept for backward per token of a training pass, all layers (see module doc)."""
    h, f = config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size)
    if autocast_dtype in (torch.bfloat16, torch.float16):
        return config.num_hidden_layers * (18 * h + 6 * f) * HALF_OVERHEAD
    return config.num_hidden_layers * (28 * h + 12 * f) * OVERHEAD


# Answer-text training keeps full-vocabulary float32 logits at every scored position: the logits
# (saved by log-sum-exp), their gradient in backward, and the log-softmax when β·KL is on.
LOGIT_COPIES = 3


def scored_bytes_per_token(config) -> float:
    """Bytes a scored answer-text position adds to a pass (see :data:`LOGIT_COPIES`)."""
    return LOGIT_COPIES * 4.0 * config.vocab_size


def available_bytes(device: torch.device) -> float | None:
    """Free memory where activations live: MemAvailable on CPU, free device memory on CUDA."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def resolve_budget(budget_gb: float | None, device: torch.device) -> float:
    """Bytes of activations a training pass may keep: ``budget_gb`` if given, else
    min(1 GB, a quarter of MemAvailable) on CPU and half the free memory on CUDA."""
    if budget_gb is not None:
        return budget_gb * GB
    free = available_bytes(device)
    if free is None:
        return CPU_CAP_GB * GB
    if device.type == "cuda":
        return CUDA_FRACTION * free
    return min(CPU_CAP_GB * GB, CPU_FRACTION * free)


def split_passes(
    n_members: int, n_rows: int, row_tokens: int, budget_tokens: float, members_per_pass: int | None
) -> tuple[int, int]:
    """(members per pass, rows of each member per pass) so that a pass's tokens
    (members · rows · row length) stay within ``budget_tokens`` where at all possible.

    Rows are split first (each pass still stacks all members, the efficient shape); members
    only when one row of each is already over budget. One row of one member is the floor.
    """
    members = min(members_per_pass or n_members, n_members)
    row_tokens = max(row_tokens, 1)
    if members * row_tokens > budget_tokens:
        members = max(1, int(budget_tokens // row_tokens))
    rows = max(1, min(n_rows, int(budget_tokens // (members * row_tokens))))
    return members, rows
