"""The KL-to-base regulariser (§3.4, Eq. 4): β·KL(p(·|x; W*+ΔW) || p(·|x; W*)) at the answer
position, over the full vocabulary.

The base model never changes, so its answer-position logits are computed once per training
question, with the adapters switched off, and reused every step: no second base forward per
step. Both sides are computed the same way: the base logits come from the same decoder output
and the same LM head under the same autocast as the trained model's in a training step, are
stored in the dtype the head produced them in (bf16 under bf16 autocast: no rounding), and
both are log-softmaxed in float32. So at initialisation (B = 0, ΔW = 0) the two distributions
are identical and β·KL is exactly zero, in bf16 as in fp32. Storage: N × vocab × 2 bytes under
half-precision autocast (80 MB for cqa's 821 questions with SmolLM2's 49k vocabulary), 4 bytes
in fp32.
"""

from __future__ import annotations

import torch

from loraens.data.prompts import EncodedQuestions
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import answer_features, head_logits, vocab_log_softmax
from loraens.runtime import Runtime


def base_logits(
    ensemble: LoRAEnsemble, encoded: EncodedQuestions, runtime: Runtime, batch_size: int = 32
) -> torch.Tensor:
    """The base model's answer-position logits for every question: (N, vocab), on the CPU, in
    the dtype the LM head computes in under ``runtime`` (see the module doc)."""
    model = ensemble.model
    with ensemble.adapters_disabled():
        features = answer_features(model, encoded, runtime, batch_size)
    with torch.inference_mode(), runtime.autocast():
        chunks = [
            head_logits(model, chunk.to(runtime.device)).cpu()
            for chunk in features.split(batch_size)
        ]
    return torch.cat(chunks)


def kl_to_base(log_probs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(p || p_base) per row: ``log_probs`` is the fine-tuned model's float32 log p (from
    :func:`~loraens.models.scoring.vocab_log_probs`), ``base`` the stored base logits."""
    base_log_probs = vocab_log_softmax(base.to(log_probs.device))
    return (log_probs.exp() * (log_probs - base_log_probs)).sum(dim=-1)
