"""Read the model's distribution at the scored positions only.

The LM head is the costliest single matmul of a small model (49k × 576 for SmolLM2) and only one
position per prompt matters, so we run the decoder, pick each row's last real token and apply the
head there: full vocabulary for the training loss (Eq. 3), label rows only for predictions.
Prompts are padded on the right; under causal attention trailing padding cannot influence earlier
positions, so no attention mask is needed and the result equals unpadded scoring.

Answer-text scoring (see :mod:`loraens.data.prompts`) reads the positions that predict each
option's tokens instead: the head is applied there only, and an option's score is the sum of its
tokens' full-vocabulary log-probabilities, normalised as asked; p_T is the softmax over the
option scores.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from loraens.data.packing import plan_rows, rows_batch


def answer_hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
):
    """Final hidden state at each question's last prompt token, shape (questions, hidden).

    Question i ends just before column ``lengths[i]`` of row ``rows[i]`` (default: row i). With
    ``position_ids`` restarting at 0 inside a row (packed questions, see
    :mod:`loraens.data.packing`) the decoder attends block-diagonally, question by question.
    """
    hidden = model.get_decoder()(
        input_ids=input_ids, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    if rows is None:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, lengths - 1]


def batch_hidden_states(model: PreTrainedModel, batch: dict, device: torch.device) -> torch.Tensor:
    """:func:`answer_hidden_states` of a :func:`loraens.data.packing.rows_batch` batch."""
    positions = batch.get("position_ids")
    return answer_hidden_states(
        model,
        batch["input_ids"].to(device),
        batch["answer_ends"].to(device),
        None if positions is None else positions.to(device),
        batch["answer_rows"].to(device),
    )


def decoder_states(model: PreTrainedModel, batch: dict, device: torch.device) -> torch.Tensor:
    """Final hidden states of every token of an answer-text ``rows_batch``, (rows, width, hidden),
    under its 4-D attention mask (each option sees the prompt and itself)."""
    mask = batch["attention_mask"].to(device)
    if model.config._attn_implementation == "eager":
        # Eager attention adds the mask to the scores; SDPA and flex take the boolean as is.
        mask = torch.zeros(mask.shape, device=device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    return model.get_decoder()(
        input_ids=batch["input_ids"].to(device),
        position_ids=batch["position_ids"].to(device),
        attention_mask=mask,
        use_cache=False,
    ).last_hidden_state


def target_states(model: PreTrainedModel, batch: dict, device: torch.device) -> torch.Tensor:
    """Hidden state at the position predicting each option token, (targets, hidden)."""
    hidden = decoder_states(model, batch, device)
    return hidden[batch["target_rows"].to(device), batch["target_cols"].to(device)]


def target_log_probs(
    model: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 512
) -> torch.Tensor:
    """log p(target | its prefix) of each scored token, float32, over the full vocabulary.

    In chunks of ``chunk`` positions so that at most chunk × vocab logits exist at once.
    """
    head = _head_in(model, hidden.dtype)  # cast once, not once per chunk as autocast would
    parts = []
    for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True):
        logits = F.linear(h, *head).float()
        parts.append(logits.gather(1, t[:, None]).squeeze(1) - logits.logsumexp(-1))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def option_scores(token_log_probs: torch.Tensor, batch: dict, normalization: str) -> torch.Tensor:
    """(questions, K_max) score of every option: its tokens' summed log-probability, divided by
    its token count (per_token) or its text's characters (per_char); 0 where an option is
    absent (callers mask it by the question's option count)."""
    tokens = batch["option_tokens"].to(token_log_probs.device)
    slots = batch["target_slots"].to(token_log_probs.device)
    sums = torch.zeros(tokens.numel(), device=tokens.device, dtype=token_log_probs.dtype)
    sums = sums.index_add(0, slots, token_log_probs).view(tokens.shape)
    if normalization == "none":
        return sums
    size = tokens if normalization == "per_token" else batch["option_chars"].to(tokens.device)
    if normalization not in ("per_token", "per_char"):
        raise ValueError(f"Unknown normalization {normalization!r}")
    return sums / size.clamp(min=1).to(sums.dtype)


def _head(model: PreTrainedModel) -> nn.Linear:
    return model.get_output_embeddings()


def _head_in(
    model: PreTrainedModel, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight and bias in ``dtype``. Autocast would cast the (frozen, often
    tied to the embedding, so float32) vocabulary-sized weight again at every call; under
    autocast ``dtype`` is the hidden states' compute dtype, so this is the same cast, once."""
    head = _head(model)
    bias = None if head.bias is None else head.bias.to(dtype)
    return head.weight.to(dtype), bias


def vocab_log_probs(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the full vocabulary, in float32 whatever the compute dtype."""
    return F.log_softmax(_head(model)(hidden).float(), dim=-1)


def label_logits(
    model: PreTrainedModel, hidden: torch.Tensor, label_ids: torch.Tensor
) -> torch.Tensor:
    """Logits of the answer-letter tokens only, (rows, n_labels), float32."""
    head = _head(model)
    logits = hidden @ head.weight[label_ids].T.to(hidden.dtype)
    if head.bias is not None:
        logits = logits + head.bias[label_ids].to(logits.dtype)
    return logits.float()


def answer_features(model: PreTrainedModel, encoded, runtime, batch_size: int = 32) -> torch.Tensor:
    """Final hidden state at the answer position of every question, (N, hidden) float32.

    For quantities of the frozen model that never change during training (last-layer
    features), computed once in length-sorted batches.
    """
    lengths = [len(ids) for ids in encoded.input_ids]
    order = np.argsort(lengths, kind="stable")
    features = torch.empty(len(encoded), model.config.hidden_size)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size].tolist()
            rows = plan_rows([batch], lengths, runtime.row_tokens)[0]
            inputs = rows_batch(encoded, rows, 0, packed=runtime.packing)
            with runtime.autocast():
                hidden = batch_hidden_states(model, inputs, runtime.device)
            features[inputs["indices"]] = hidden.float().cpu()
    return features
