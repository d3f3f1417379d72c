"""The KL-to-base regulariser (§3.4, Eq. 4): β·KL(p(·|x; W*+ΔW) || p(·|x; W*)) at the answer
position, over the full vocabulary.

The base distribution is computed in every step, by a second forward of the very same stacked
batch with the adapters switched off and no gradient: same rows, same padding, same autocast,
same head, same float32 log-softmax as the trained side. Both sides therefore go through
identical kernels, and at initialisation (B = 0, ΔW = 0) they are bit-identical, so β·KL is
exactly zero in bf16 as in fp32. A reference computed once per question in other batches
agrees only up to kernel rounding: under bf16 on SmolLM2-135M it gave 1.5e-3 nats of KL at
B = 0 with the head outside autocast, and still up to 4.6e-4 with it inside. The price is one
extra no-gradient forward per step in runs with β > 0, and no N × vocab reference in memory.

Answer-text scoring has no single answer position: its analogue is the full-vocabulary KL at
each position the loss reads (each token of the correct option for the token NLL, of every
option for the K-way NLL), averaged over those positions per question so that β means the same
per position as in letter mode whatever the options' lengths. The base side is the same rows
under the same mask with the adapters off.
"""

from __future__ import annotations

import torch

from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import batch_hidden_states, target_states, vocab_log_probs
from loraens.runtime import Runtime


def base_log_probs(ensemble: LoRAEnsemble, batch: dict, runtime: Runtime) -> torch.Tensor:
    """log p_base(· | x) at each question's answer position in a training ``batch`` (a
    :func:`loraens.data.packing.rows_batch`), (questions, vocab) float32, computed exactly as the
    trained side is but with ΔW = 0 and without gradient."""
    with torch.no_grad(), ensemble.adapters_disabled(), runtime.autocast():
        hidden = batch_hidden_states(ensemble.model, batch, runtime.device)
        return vocab_log_probs(ensemble.model, hidden)


def base_target_log_probs(
    ensemble: LoRAEnsemble, batch: dict, runtime: Runtime, read: torch.Tensor | None
) -> torch.Tensor:
    """log p_base(· | prefix) at the answer-text positions ``read`` (a boolean over the batch's
    targets; None: all), (positions, vocab) float32, as :func:`base_log_probs` does."""
    with torch.no_grad(), ensemble.adapters_disabled(), runtime.autocast():
        hidden = target_states(ensemble.model, batch, runtime.device)
        return vocab_log_probs(ensemble.model, hidden if read is None else hidden[read])


def kl_to_base(log_probs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(p || p_base) = Σ p (log p - log p_base) per row, from float32 log-probabilities."""
    return (log_probs.exp() * (log_probs - base)).sum(dim=-1)
