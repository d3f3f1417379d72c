"""Stacked passes with gradients: the option logits of M members on a batch of questions, and
what every LoRA layer saw on the way (its weights' inputs, and their outputs' gradients when a
backward pass reaches them).

A posterior needs per-question quantities (K-FAC's per-token statistics, the Jacobian of each
question's K option logits), so these passes give every question a row of its own (no
packing): a row's tokens all belong to one question and one member, and a token's output
gradient comes from that question's logits alone, because the loss or logit differentiated is
a sum over rows that never attend to each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraens.data.packing import plan_rows, rows_batch
from loraens.data.prompts import EncodedQuestions
from loraens.evaluation.inference import option_logits
from loraens.models.lora import LoRAEnsemble
from loraens.runtime import Runtime

GradCallback = Callable[[str, str, torch.Tensor, torch.Tensor], None]
"""``(layer, "A" or "B", the weight's input, its output's gradient)``; both tensors are
(members, rows · width, features), rows grouped by member."""


@dataclass
class StackedPass:
    """The option logits of one batch: every active member's rows, then one question per row."""

    logits: torch.Tensor  # (members, questions, K_max), float32, differentiable
    questions: np.ndarray  # (questions,) indices into the encoded set, in row order
    n_choices: np.ndarray  # (questions,) options each question has
    valid: torch.Tensor  # (questions, width) True on a question's tokens, False on padding


def question_batches(
    encoded: EncodedQuestions, batch_size: int, questions: Sequence[int] | None = None
) -> list[np.ndarray]:
    """Longest-first batches of at most ``batch_size`` questions (similar lengths pad little)."""
    pool = np.arange(len(encoded)) if questions is None else np.asarray(questions, dtype=int)
    lengths = np.asarray([len(encoded.input_ids[i]) for i in pool])
    order = pool[np.argsort(-lengths, kind="stable")]
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def stacked_pass(
    ensemble: LoRAEnsemble,
    encoded: EncodedQuestions,
    batch: np.ndarray,
    label_ids: torch.Tensor,
    runtime: Runtime,
) -> StackedPass:
    """Forward ``batch`` through every member at once, gradients on (call inside a
    :meth:`~loraens.models.lora.LoRAEnsemble.probed` block to see the layers)."""
    lengths = [len(ids) for ids in encoded.input_ids]
    rows = plan_rows([batch], lengths, None)[0]
    n_members = ensemble.n_members
    inputs = rows_batch(encoded, rows * n_members, 0, packed=False)
    n_labels = max(encoded.n_choices)
    with runtime.autocast():
        logits = option_logits(
            ensemble.model, inputs, runtime, label_ids[:n_labels], encoded.options
        )
    order = inputs["indices"][: len(batch)].numpy()
    width = inputs["input_ids"].shape[1]
    own = inputs["lengths"][: len(batch)]
    return StackedPass(
        logits=logits.float().view(n_members, len(batch), n_labels),
        questions=order,
        n_choices=np.asarray([encoded.n_choices[i] for i in order]),
        valid=torch.arange(width)[None, :] < own[:, None],
    )


def masked_logits(logits: torch.Tensor, n_choices: np.ndarray) -> torch.Tensor:
    """``logits`` with the options a question lacks at -inf (softmax gives them 0)."""
    k = logits.shape[-1]
    absent = torch.as_tensor(np.arange(k)[None, :] >= n_choices[:, None], device=logits.device)
    return logits.masked_fill(absent, float("-inf"))


class GradTap:
    """A probe (:meth:`LoRAEnsemble.probed`) that hands each weight's input and output gradient
    to ``on_grad`` whenever a backward pass reaches that weight."""

    def __init__(self, on_grad: GradCallback):
        self.on_grad = on_grad

    def __call__(self, name, layer, a_in, a_out, b_in, b_out) -> None:
        a_in, b_in = a_in.detach(), b_in.detach()
        if a_out.requires_grad:
            a_out.register_hook(lambda grad: self.on_grad(name, "A", a_in, grad.detach()))
        if b_out.requires_grad:
            b_out.register_hook(lambda grad: self.on_grad(name, "B", b_in, grad.detach()))
