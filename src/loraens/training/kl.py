"""The KL-to-base regulariser (§3.4): β·KL(p(·|x; W*+ΔW) || p(·|x; W*)) at the answer position.

The base model never changes, so its next-token distribution is computed once per training
question, with the adapters switched off, and reused every step: no second base forward per
step. It is stored as float16 log-probabilities (N × vocab × 2 bytes: 80 MB for cqa's 821
questions with SmolLM2's 49k vocabulary). float16 keeps ~3 significant digits: for tokens
carrying the fine-tuned model's mass (log p > -10) the rounding is below 0.005 nats per token,
so the KL term moves by well under 1% of its value; tokens below that contribute e^-10 or less.
"""

from __future__ import annotations

import torch

from loraens.data.prompts import EncodedQuestions
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import answer_features, vocab_log_probs
from loraens.runtime import Runtime


def base_log_probs(
    ensemble: LoRAEnsemble, encoded: EncodedQuestions, runtime: Runtime, batch_size: int = 32
) -> torch.Tensor:
    """log p_base(· | x_i) over the full vocabulary for every question: (N, vocab) float16."""
    model = ensemble.model
    with ensemble.adapters_disabled():
        features = answer_features(model, encoded, runtime, batch_size)
    with torch.inference_mode():
        chunks = [
            vocab_log_probs(model, chunk.to(runtime.device)).to(torch.float16).cpu()
            for chunk in features.split(batch_size)
        ]
    return torch.cat(chunks)


def kl_to_base(log_probs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(p || p_base) per row, from float32 log p and stored log p_base."""
    return (log_probs.exp() * (log_probs - base.to(log_probs.dtype))).sum(dim=-1)
