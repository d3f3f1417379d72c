"""Score every member on a question set in stacked, gradient-free passes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from loraens.data.packing import plan_rows, rows_batch
from loraens.data.prompts import AnswerOptions, EncodedQuestions
from loraens.evaluation.metrics import ensemble_log_probs, normalize_label_log_probs
from loraens.models.loading import parameters_held_in
from loraens.models.lora import LoRAEnsemble
from loraens.models.scoring import (
    batch_hidden_states,
    label_logits,
    option_scores,
    target_log_probs,
    target_states,
)
from loraens.runtime import Runtime

# Tokens of one gradient-free pass (rows of every member in it together). Scoring the demo run
# (5 members, 96 ARC-Easy questions of about 70 tokens) on a 2-core AVX2 EPYC in fp32 took
# 64.3 s with 32 questions per pass (about 11k tokens), 51.2 s with 8, 48.5 s with 4 (about
# 1.4k tokens) and 49.8 s with 2 (bench/eval_pass.py, 2026-11-29): big passes spill the
# caches and fault in fresh activation buffers, small ones underfill the matmuls.
PASS_TOKENS = 2048


def token_bounded_batches(
    order: np.ndarray, lengths: Sequence[int], batch_size: int, max_tokens: int
) -> list[np.ndarray]:
    """Consecutive groups of ``order``: at most ``batch_size`` questions and, once a group holds
    one question, at most ``max_tokens`` prompt tokens."""
    batches: list[np.ndarray] = []
    start, tokens = 0, 0
    for end, question in enumerate(order):
        size = lengths[question]
        if end > start and (end - start == batch_size or tokens + size > max_tokens):
            batches.append(order[start:end])
            start, tokens = end, 0
        tokens += size
    if start < len(order):
        batches.append(order[start:])
    return batches


def member_slices(n_members: int, members_per_pass: int | None) -> list[slice]:
    """Contiguous groups of members processed together in one pass."""
    size = members_per_pass or n_members
    return [slice(start, min(start + size, n_members)) for start in range(0, n_members, size)]


def option_logits(
    model, inputs: dict, runtime: Runtime, label_ids: torch.Tensor, options: AnswerOptions | None
) -> torch.Tensor:
    """(questions, K_max) logits of p_T: letter logits, or answer-text option scores."""
    if options is None:
        return label_logits(model, batch_hidden_states(model, inputs, runtime.device), label_ids)
    hidden = target_states(model, inputs, runtime.device)
    token_log_probs = target_log_probs(model, hidden, inputs["target_ids"].to(runtime.device))
    return option_scores(token_log_probs, inputs, options.normalization)


def score_members(
    ensemble: LoRAEnsemble,
    encoded: EncodedQuestions,
    label_ids: torch.Tensor,
    runtime: Runtime,
    *,
    batch_size: int = 32,
    members_per_pass: int | None = None,
    mc_dropout_passes: int = 1,
    progress: bool = False,
    desc: str = "eval",
    questions: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Log p_T (Eq. 1) of every member on every question: (members·passes, questions, options).

    Questions go in batches of at most ``batch_size``, fewer where their rows in one pass would
    exceed :data:`PASS_TOKENS`. Each batch is replicated once per member in the pass, so one
    forward computes
    all of their answer distributions; options a question does not have are -inf. With
    ``mc_dropout_passes`` > 1 adapter dropout stays on and each member's rows are replicated
    that many times more: every copy draws its own dropout mask, giving MC dropout's stochastic
    passes in the same single forward. With ``runtime.packing`` a batch's questions are packed
    into rows once (see :mod:`loraens.data.packing`) and the rows replicated per member.
    ``questions`` limits scoring to those question indices
    (a rank's share in a distributed run); the other questions' rows stay -inf.

    Answer-text questions (``encoded.options``) are scored by their options' log-likelihoods
    instead (see :mod:`loraens.models.scoring`); ``label_ids`` is then unused.
    """
    n = len(encoded)
    n_labels = max(encoded.n_choices)
    passes = mc_dropout_passes
    out = np.full((ensemble.n_members * passes, n, n_labels), -np.inf)
    model = ensemble.model
    was_training = model.training
    model.eval()
    pool = np.arange(n) if questions is None else np.asarray(questions, dtype=int)
    # Longest prompts first: each batch is then padded to lengths close to its own.
    lengths = [len(ids) for ids in encoded.input_ids]
    order = pool[np.argsort([-lengths[i] for i in pool], kind="stable")]
    slices = member_slices(ensemble.n_members, members_per_pass)
    copies = max(m.stop - m.start for m in slices) * passes  # rows per question in a pass
    batches = token_bounded_batches(order, lengths, batch_size, max(PASS_TOKENS // copies, 1))
    dropout = ensemble.dropout_active() if passes > 1 else contextlib.nullcontext()
    # fp32 scoring of half base weights (a bf16 run's own evaluation) reads them upcast:
    # half-precision GEMMs pick kernels by the pass's shape, so a question's probabilities
    # would move with the other questions in its pass.
    # Cast outside inference mode: the restored weights must stay usable by autograd.
    upcast = runtime.autocast_dtype is None
    held = ensemble.base_parameters() if upcast else []
    try:
        with (
            parameters_held_in(held, torch.float32),
            torch.inference_mode(),
            runtime.autocast(),
            dropout,
        ):
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                _score_batch(
                    ensemble, encoded, batch, lengths, slices, passes, label_ids, runtime, out
                )
    finally:
        model.train(was_training)
    return out


def _score_batch(
    ensemble: LoRAEnsemble,
    encoded: EncodedQuestions,
    batch: np.ndarray,
    lengths: Sequence[int],
    slices: list[slice],
    passes: int,
    label_ids: torch.Tensor,
    runtime: Runtime,
    out: np.ndarray,
) -> None:
    """One batch of questions through every slice of members; fills their rows of ``out``."""
    n_labels = out.shape[-1]
    rows = plan_rows([batch], lengths, runtime.row_tokens)[0]
    for members in slices:
        n_active = (members.stop - members.start) * passes
        inputs = rows_batch(
            encoded,
            rows * n_active,
            0,
            packed=runtime.packing,
            width_multiple=runtime.width_multiple,
        )
        with ensemble.members(members):
            logits = option_logits(
                ensemble.model, inputs, runtime, label_ids[:n_labels], encoded.options
            )
        by_copy = logits.view(n_active, len(batch), n_labels).cpu().double().numpy()
        scored = inputs["indices"][: len(batch)].numpy()  # row order of one copy
        n_choices = np.asarray([encoded.n_choices[i] for i in scored])
        first_row = members.start * passes
        for offset in range(n_active):
            out[first_row + offset, scored] = normalize_label_log_probs(by_copy[offset], n_choices)


def score_draws(
    ensemble: LoRAEnsemble,
    draws: dict[str, torch.Tensor],
    samples: int,
    encoded: EncodedQuestions,
    label_ids: torch.Tensor,
    runtime: Runtime,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """(members, questions, K) log-probs: each member's mean over its ``samples`` weight draws
    (``draws``: A and B of members · samples members, member-major, as posteriors and BLoB
    draw them), scored as members of one stacked pass."""
    with ensemble.adapters(draws):
        per_draw = score_members(
            ensemble, encoded, label_ids, runtime, batch_size=batch_size, progress=progress
        )
    return mean_over_draws(per_draw, samples)


def mean_over_draws(per_draw: np.ndarray, samples: int) -> np.ndarray:
    """(members · S, N, K) log-probs -> (members, N, K): log of each member's mean p."""
    grouped = per_draw.reshape(-1, samples, *per_draw.shape[1:])
    return np.stack([ensemble_log_probs(draws) for draws in grouped])


VARIATIONAL_DRAW_SEED = 0
"""Seed of a variational (BLoB) run's test-time draws: every set is scored with the same."""


def score_variational(
    ensemble: LoRAEnsemble,
    encoded: EncodedQuestions,
    label_ids: torch.Tensor,
    runtime: Runtime,
    samples: int,
    *,
    first_member: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """(members, questions, K) of a variational ensemble (BLoB): each member's mean over
    ``samples`` weight draws, member m's drawn from seed VARIATIONAL_DRAW_SEED +
    ``first_member`` + m (its global index, whichever process holds it)."""
    seeds = [VARIATIONAL_DRAW_SEED + first_member + m for m in range(ensemble.n_members)]
    draws = ensemble.variational_draws(samples, seeds)
    return score_draws(
        ensemble, draws, samples, encoded, label_ids, runtime, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
