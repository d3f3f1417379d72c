"""Read the model's distribution at the answer position only.

The LM head is the costliest single matmul of a small model (49k × 576 for SmolLM2) and only one
position per prompt matters, so we run the decoder, pick each row's last real token and apply the
head there: full vocabulary for the training loss (Eq. 3), label rows only for predictions.
Prompts are padded on the right; under causal attention trailing padding cannot influence earlier
positions, so no attention mask is needed and the result equals unpadded scoring.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def answer_hidden_states(model: nn.Module, input_ids: torch.Tensor, lengths: torch.Tensor):
    """Final hidden state at each row's last prompt token, shape (rows, hidden)."""
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, lengths - 1]


def _head(model: nn.Module) -> nn.Linear:
    return model.get_output_embeddings()


def vocab_log_probs(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the full vocabulary, in float32 whatever the compute dtype."""
    return F.log_softmax(_head(model)(hidden).float(), dim=-1)


def label_logits(model: nn.Module, hidden: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the answer-letter tokens only, (rows, n_labels), float32."""
    head = _head(model)
    logits = hidden @ head.weight[label_ids].T.to(hidden.dtype)
    if head.bias is not None:
        logits = logits + head.bias[label_ids].to(logits.dtype)
    return logits.float()
