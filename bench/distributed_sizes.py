"""The numbers of docs/distributed.md: bytes communicated and memory per rank, computed.

    .venv/bin/python bench/distributed_sizes.py           # prints the tables (arithmetic only)
    .venv/bin/python bench/distributed_sizes.py --check   # also measures the activation formula

Sizes (B = bytes; fp32 = 4 B, fp64 = 8 B, bf16 = 2 B):

- LoRA parameters per member, P = L · Σ_targets r·(d_in + d_out)  (q: h→h, v: h→kv·head_dim).
- Per step, every mode: one all_reduce of M fp64 losses = 8·M B.
- Per step, data mode: one all_reduce of the member's LoRA gradients = 4·P B, in its group.
- Per evaluation: an all_gather of (members on the rank, N, K) fp64 log-probs: every rank sends
  8·m_max·N·K B (m_max = most members on one rank) and receives W times that.
- Per epoch (checkpoint): an all_gather of adapters + AdamW's two moments (+ the best epoch's
  adapters under optim.patience) = (3 or 4)·4·P·m_max B sent per rank, W times that received.
- Memory per rank: weights (bf16) 2·N_params B; LoRA + gradient + AdamW moments 16·P B per
  member held; activations kept for backward per pass
      A = rows · T · L · (18·h + 6·f) B          rows = members in the pass × batch size
  with bf16 activations, fused attention (q, k, v, output kept: 8h; no T×T matrix), HF
  Llama's RMSNorm keeping its fp32 input (2 × 4h), the shared input of the q/v LoRA A matrices
  (2h) and the SwiGLU MLP keeping gate, up and silu(gate) (6f). The frozen projections need no
  saved input: only their weight takes part in backward. `--check` counts the bytes autograd
  actually saves on a small Llama (h = 256, f = 640) and compares them with the formula.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Arch:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    def params(self) -> int:
        h, f = self.hidden, self.intermediate
        layer = 2 * h * h + 2 * h * self.kv_dim + 3 * h * f + 2 * h
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h

    def lora_params(self, rank: int = 8) -> int:
        """q (h -> h) and v (h -> kv_dim), rank r, every layer."""
        h = self.hidden
        return self.layers * rank * ((h + h) + (h + self.kv_dim))

    def activation_bytes_per_token(self) -> int:
        return self.layers * (18 * self.hidden + 6 * self.intermediate)


SMOLLM2 = Arch("SmolLM2-135M", 30, 576, 9, 3, 1536, 49152, tied=True)
LLAMA2_13B = Arch("LLaMA-2-13B", 40, 5120, 40, 40, 13824, 32000, tied=False)
BATCH = {"cqa": 32, "obqa/arc": 16, "mmlu": 8}


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def communication(arch: Arch = SMOLLM2) -> None:
    p = arch.lora_params()
    print(f"## Communication, {arch.name} ({p:,} LoRA parameters per member, r = 8 on q, v)\n")
    n_eval, k, n_train, batch = 400, 5, 821, 32  # cqa
    steps = math.ceil(n_train / batch)
    print("| what | when | bytes per rank |")
    print("|---|---|---|")
    for members, world in ((5, 2), (20, 4), (1, 2), (5, 10)):
        mode = "members" if world <= members else "data"
        m_max = math.ceil(members / world) if mode == "members" else 1
        tag = f"M={members}, W={world} ({mode} mode)"
        print(f"| {tag}: step losses + NaN flags (all_reduce) | every step | {8 * members} B |")
        if mode == "data":
            print(f"| {tag}: LoRA gradients (all_reduce in the member's group) | every step | "
                  f"{_mb(4 * p)} |")  # fmt: skip
        sent = 8 * m_max * n_eval * k
        print(f"| {tag}: eval log-probs, cqa 400 × 5 (all_gather) | every evaluation | "
              f"{_mb(sent)} sent, {_mb(world * sent)} received |")  # fmt: skip
        ckpt, best = 3 * 4 * p * m_max, 4 * p * m_max
        received = f"{_mb(world * ckpt)} received (+{_mb(best)} sent with optim.patience)"
        print(f"| {tag}: adapters + AdamW moments (all_gather) | every epoch | "
              f"{_mb(ckpt)} sent, {received} |")  # fmt: skip
    print(f"\ncqa at batch {batch}: {steps} steps per epoch. Data mode sends "
          f"{_mb(4 * p * steps)} of gradients per epoch per rank (ring all_reduce: about twice "
          f"that on the wire).\n")  # fmt: skip


def memory(arch: Arch = LLAMA2_13B, gpu_gb: float = 80.0) -> None:
    p, n = arch.lora_params(), arch.params()
    weights = 2 * n
    per_member = 16 * p  # fp32 weight + gradient + two AdamW moments
    act = arch.activation_bytes_per_token()
    print(f"## Memory per rank, {arch.name} in bf16 ({n / 1e9:.2f} B parameters)\n")
    print(f"- base weights, bf16: {weights / GB:.2f} GB on every rank")
    print(f"- LoRA per member: {p:,} parameters; with gradient and AdamW moments "
          f"{per_member / 1e6:.1f} MB (M = 5: {5 * per_member / GB:.2f} GB, "
          f"M = 20: {20 * per_member / GB:.2f} GB, if one rank held them all)")  # fmt: skip
    print(f"- activations: {act / 1e6:.2f} MB per token (all {arch.layers} layers)\n")
    for length in (512, 128):
        print(f"### Prompts padded to T = {length} tokens (GB per rank; {gpu_gb:.0f} GB GPU)\n")
        print("| task (batch) | M | 1 GPU, all M in one pass | 1 GPU, members_per_pass 1 "
              "| W = M GPUs (1 member each) "
              "| fewest ranks per member that fit: G (GB; W = M·G) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for task, batch in BATCH.items():
            one_member = batch * length * act
            for members in (5, 20):
                stacked = weights + members * per_member + members * one_member
                sequential = weights + members * per_member + one_member
                spread = weights + per_member + one_member
                fits = None
                for group in range(1, batch + 1):  # data mode from G = 2 on
                    rows = math.ceil(batch / group)
                    total = weights + per_member + rows * length * act
                    if total <= gpu_gb * GB:
                        fits = f"{group} ({total / GB:.1f}; W = {members * group})"
                        break
                print(f"| {task} ({batch}) | {members} | {stacked / GB:.1f} | "
                      f"{sequential / GB:.1f} | {spread / GB:.1f} | {fits or 'no'} |")  # fmt: skip
        print()


def check() -> None:
    """Bytes autograd saves for backward, against the formula, on a small random Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraens.models.lora import LoRAEnsemble
    from loraens.models.scoring import answer_hidden_states, vocab_log_probs

    h, f, layers, rows, length = 256, 640, 2, 4, 128
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=h,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    ensemble = LoRAEnsemble(model, 2)
    ensemble.init_members([1, 2])
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in frozen:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 1000, (rows, length))
    model.train()
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        vocab_log_probs(model, answer_hidden_states(model, ids, torch.full((rows,), length)))
    measured = sum(saved.values()) / (rows * length * layers)
    print(f"measured {measured:.0f} B per token per layer; formula 18h + 6f = {18 * h + 6 * f} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="measure the activation formula")
    args = parser.parse_args()
    communication()
    memory()
    if args.check:
        check()


if __name__ == "__main__":
    main()
