"""The few-shot baseline (§5.1): the base model, no adapters, k demonstrations before each prompt.

For every eval question, k labelled train questions are drawn without replacement and written
before its prompt as solved examples. Each demonstration is the full paper prompt followed by its
answer letter, ``)`` and :data:`DEMO_SEPARATOR`::

    Q: {demo question}
    Answer Choices:
    (a) ...
    (b) ...
    A: (b)

    Q: {eval question}
    Answer Choices:
    ...
    A: (

The model then reads the answer letter at the final cue exactly as for the fine-tuned members.

With answer-text scoring (``scoring="answer_text"``) every demonstration is the answer-text
prompt followed by its correct option's text (lm-eval's few-shot layout, ``"\n\n"`` between
examples)::

    Question: {demo question}
    Answer: {correct option text}

    Question: {eval question}
    Answer:

and the eval question's options are scored after the final cue as in zero-shot.
The paper reports metrics averaged over 10 random draws of the demonstrations; draw ``d`` uses a
generator keyed by ``(seed, d)`` so any draw can be rebuilt on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from loraens.config import DataConfig, Normalization, RuntimeConfig, Scoring
from loraens.data.prompts import (
    LETTERS,
    AnswerOptions,
    EncodedQuestions,
    encode_prompt,
    encode_text,
    encode_text_question,
    encode_with_options,
    format_prompt,
    format_text_prompt,
    option_continuation,
    scoring_label_ids,
)
from loraens.data.records import Question
from loraens.data.sources import load_run_data
from loraens.evaluation.inference import score_members
from loraens.evaluation.metrics import summarize
from loraens.evaluation.tables import METRICS
from loraens.models.loading import load_base_model
from loraens.models.lora import LoRAEnsemble
from loraens.rundir import FewShotResult
from loraens.runtime import Runtime, runtime_from_config, scoring_runtime

DEFAULT_K = 3
DEFAULT_DRAWS = 10

# What closes a demonstration after its answer letter: ")" ends the "(b" that the cue opened and
# a blank line separates it from the next "Q:", the layout of the App. C prompts laid end to end.
ANSWER_CLOSE = ")"
DEMO_SEPARATOR = "\n\n"


def demonstration_text(q: Question, scoring: Scoring = "letter") -> str:
    """One solved example: the paper prompt, the answer letter, ``)`` and the separator (letter
    scoring), or the answer-text prompt, the correct option's text and the separator."""
    if q.answer is None:
        raise ValueError(f"Demonstration {q.id!r} has no answer; few-shot needs labelled train.")
    if scoring == "answer_text":
        return (
            format_text_prompt(q.question)
            + option_continuation(q.choices[q.answer])
            + DEMO_SEPARATOR
        )
    return format_prompt(q.question, q.choices) + LETTERS[q.answer] + ANSWER_CLOSE + DEMO_SEPARATOR


@dataclass(frozen=True)
class FewShotPrompt:
    """An eval question and the demonstrations drawn for it (in the order they are shown)."""

    question: Question
    demonstrations: tuple[Question, ...]

    def text(self, n_demos: int | None = None, scoring: Scoring = "letter") -> str:
        """The full prompt string, with the last ``n_demos`` demonstrations (default: all); for
        answer-text scoring it ends at the cue, the options are appended when encoding."""
        demos = self.demonstrations if n_demos is None else self._last(n_demos)
        q = self.question
        own = (
            format_text_prompt(q.question)
            if scoring == "answer_text"
            else format_prompt(q.question, q.choices)
        )
        return "".join(demonstration_text(d, scoring) for d in demos) + own

    def _last(self, n_demos: int) -> tuple[Question, ...]:
        # Keep the demonstrations nearest the question: dropping from the front leaves the
        # remaining text unchanged right up to the eval prompt.
        return self.demonstrations[len(self.demonstrations) - n_demos :] if n_demos else ()


def _same_question_key(q: Question) -> tuple[str, tuple[str, ...]]:
    return q.question, tuple(q.choices)


def few_shot_prompts(
    train: Sequence[Question],
    evaluation: Sequence[Question],
    k: int = DEFAULT_K,
    seed: int = 0,
    draw: int = 0,
) -> list[FewShotPrompt]:
    """Draw ``k`` demonstrations (without replacement) from ``train`` for every eval question.

    A train question is never a demonstration for itself: any train question with the eval
    question's id, or with identical question text and choices, is excluded. The generator is
    keyed by ``(seed, draw)`` and consumed in eval order, so the result depends only on the two
    question lists and those keys.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if any(q.answer is None for q in train):
        raise ValueError("Every train question needs an answer to serve as a demonstration.")
    by_id: dict[str, list[int]] = {}
    by_text: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for index, q in enumerate(train):
        by_id.setdefault(q.id, []).append(index)
        by_text.setdefault(_same_question_key(q), []).append(index)

    rng = np.random.default_rng([seed, draw])
    prompts = []
    for q in evaluation:
        excluded = set(by_id.get(q.id, ())) | set(by_text.get(_same_question_key(q), ()))
        if len(train) - len(excluded) < k:
            raise ValueError(
                f"Question {q.id!r}: only {len(train) - len(excluded)} train questions are "
                f"eligible as demonstrations, fewer than k={k}."
            )
        # Drawing k + |excluded| distinct indices and discarding the excluded ones leaves a
        # uniformly random ordered k-subset of the eligible questions.
        picked = rng.choice(len(train), size=k + len(excluded), replace=False)
        chosen = [int(i) for i in picked if int(i) not in excluded][:k]
        prompts.append(FewShotPrompt(q, tuple(train[i] for i in chosen)))
    return prompts


@dataclass(frozen=True)
class FewShotEncoding:
    """Token ids of every few-shot prompt and how many demonstrations each kept."""

    encoded: EncodedQuestions
    n_demos: list[int]
    k: int

    @property
    def n_fewer_demos(self) -> int:
        """Prompts that had to drop demonstrations to fit ``max_length``."""
        return sum(n < self.k for n in self.n_demos)


def encode_few_shot(
    tokenizer,
    prompts: Sequence[FewShotPrompt],
    max_length: int,
    scoring: Scoring = "letter",
    normalization: Normalization = "none",
) -> FewShotEncoding:
    """Tokenise few-shot prompts; too long ones lose demonstrations, never their own question.

    The whole string is encoded at once (tokenisation does not compose across a join). When it
    exceeds ``max_length`` the demonstration farthest from the question is dropped, then the
    next, until it fits. With none left the prompt is the plain zero-shot one, shortened by
    :func:`loraens.data.prompts.encode_prompt` if even that is too long (its choices and cue
    are never cut). With answer-text scoring ``max_length`` bounds the prompt with every
    option, as in :func:`loraens.data.prompts.encode_text_question`.
    """
    if not prompts:
        raise ValueError("No prompts to encode.")
    text_mode = scoring == "answer_text"
    input_ids, n_demos, shortened, lengths = [], [], 0, []
    for prompt in prompts:
        q = prompt.question
        ids, option_lengths = None, []
        for n in range(len(prompt.demonstrations), 0, -1):
            if text_mode:
                trial, trial_lengths = encode_with_options(
                    tokenizer, prompt.text(n, scoring), q.choices
                )
            else:
                trial, trial_lengths = encode_text(tokenizer, prompt.text(n)), []
            if len(trial) <= max_length:
                ids, option_lengths, kept = trial, trial_lengths, n
                break
        if ids is None:
            if text_mode:
                ids, option_lengths, was_shortened = encode_text_question(tokenizer, q, max_length)
            else:
                ids, was_shortened = encode_prompt(tokenizer, q, max_length)
            kept, shortened = 0, shortened + was_shortened
        input_ids.append(ids)
        lengths.append(option_lengths)
        n_demos.append(kept)
    questions = [p.question for p in prompts]
    options = None
    if text_mode:
        chars = [[len(c) for c in q.choices] for q in questions]
        options = AnswerOptions(lengths, chars, normalization)
    encoded = EncodedQuestions(
        input_ids=input_ids,
        n_choices=[len(q.choices) for q in questions],
        labels=[-1 if q.answer is None else q.answer for q in questions],
        n_shortened=shortened,
        options=options,
    )
    return FewShotEncoding(encoded, n_demos, k=max(len(p.demonstrations) for p in prompts))


@contextmanager
def base_model_as_ensemble(model: PreTrainedModel) -> Iterator[LoRAEnsemble]:
    """The unchanged base model seen as a 1-member :class:`LoRAEnsemble`, so it can be scored
    by :func:`score_members` (the one scoring loop) rather than by a copy of it.

    The member's B is zero, so ΔW = 0 exactly and the logits are the base model's. Wrapping
    replaces the query projections in place; on exit the original modules and ``requires_grad``
    flags are put back, leaving the caller's model as it was.
    """
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    # Rank 1 on the query projections alone: the cheapest wrapper score_members accepts.
    ensemble = LoRAEnsemble(model, n_members=1, rank=1, alpha=1.0, target_modules=("q_proj",))
    # The new (zero) adapter tensors are created on the CPU; put them beside the model.
    device = next(model.parameters()).device
    for layer in ensemble.lora_layers.values():
        layer.to(device)
    try:
        yield ensemble
    finally:
        for name, layer in ensemble.lora_layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def score_few_shot(
    model: PreTrainedModel,
    tokenizer,
    prompts: Sequence[FewShotPrompt],
    runtime: Runtime,
    *,
    max_length: int = 512,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "few-shot",
    scoring: Scoring = "letter",
    normalization: Normalization = "none",
) -> tuple[np.ndarray, FewShotEncoding]:
    """The base model's log p_T on each few-shot prompt, shape (N, K_max), and its encoding."""
    questions = [p.question for p in prompts]
    n_letters = max(len(q.choices) for q in questions)
    label_ids = torch.tensor(scoring_label_ids(tokenizer, n_letters, scoring), dtype=torch.long)
    encoding = encode_few_shot(tokenizer, prompts, max_length, scoring, normalization)
    with base_model_as_ensemble(model) as ensemble:
        log_probs = score_members(
            ensemble,
            encoding.encoded,
            label_ids.to(runtime.device),
            runtime,
            batch_size=batch_size,
            progress=progress,
            desc=desc,
        )
    return log_probs[0], encoding


def few_shot_draws(
    base_model: PreTrainedModel,
    tokenizer,
    train: Sequence[Question],
    evaluation: Sequence[Question],
    k: int = DEFAULT_K,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    *,
    runtime: Runtime | None = None,
    max_length: int = 512,
    batch_size: int = 32,
    progress: bool = False,
    scoring: Scoring = "letter",
    normalization: Normalization = "none",
) -> tuple[np.ndarray, dict]:
    """The few-shot baseline: log p_T of the base model for each demonstration draw, shape
    (draws, N, K_max), and the metrics of each draw with their mean and std.

    The summary is ``{"k", "draws", "seed", "per_draw": [...], "mean": {...}, "std": {...}}``.
    Each per-draw row holds accuracy, nll, ece, brier, ``n_fewer_demos`` (prompts that dropped
    demonstrations to fit ``max_length``) and ``n_shortened`` (zero-shot prompts whose question
    text was shortened). ``std`` is the population std over draws (as in the report tables).
    ``runtime`` defaults to fp32 on the model's device; ``scoring`` and ``normalization`` as
    model.scoring and model.normalization (see :mod:`loraens.data.prompts`).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not evaluation:
        raise ValueError("No eval questions.")
    if any(q.answer is None for q in evaluation):
        raise ValueError("Few-shot evaluation needs an answer for every eval question.")
    if runtime is None:
        runtime = Runtime(device=next(base_model.parameters()).device, autocast_dtype=None)
    labels = np.asarray([q.answer for q in evaluation])
    per_draw, all_log_probs = [], []
    for draw in range(draws):
        prompts = few_shot_prompts(train, evaluation, k, seed, draw)
        log_probs, encoding = score_few_shot(
            base_model,
            tokenizer,
            prompts,
            runtime,
            max_length=max_length,
            batch_size=batch_size,
            progress=progress,
            desc=f"few-shot draw {draw + 1}/{draws}",
            scoring=scoring,
            normalization=normalization,
        )
        all_log_probs.append(log_probs)
        per_draw.append(
            {
                "draw": draw,
                **summarize(log_probs, labels),
                "n_fewer_demos": encoding.n_fewer_demos,
                "n_shortened": encoding.encoded.n_shortened,
            }
        )
    summary = {
        "k": k,
        "draws": draws,
        "seed": seed,
        "per_draw": per_draw,
        "mean": {m: float(np.mean([row[m] for row in per_draw])) for m in METRICS},
        "std": {m: float(np.std([row[m] for row in per_draw])) for m in METRICS},
    }
    return np.stack(all_log_probs), summary


@dataclass(frozen=True)
class FewShotScores:
    """The few-shot baseline on a data set: what was scored and what came out."""

    eval_questions: list[Question]
    log_probs: np.ndarray
    """(draws, N, K_max) log p_T of the base model, one row per demonstration draw."""
    result: FewShotResult
    """The metrics of :func:`few_shot_draws`, as a run directory's few_shot.json holds them."""


def run_few_shot(
    model: str,
    data: DataConfig,
    runtime: RuntimeConfig,
    *,
    k: int = DEFAULT_K,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    max_length: int = 512,
    scoring: Scoring = "letter",
    normalization: Normalization = "none",
) -> FewShotScores:
    """Load the base ``model`` and the questions of ``data`` and score :func:`few_shot_draws`:
    the whole baseline, as the ``few_shot`` command and experiment cells run it.

    ``data``'s train split supplies the demonstrations and its eval split is scored; ``runtime``
    gives the device, precision, eval batch size and progress bars.
    """
    train_qs, eval_qs = load_run_data(data)
    # Few-shot only scores: in the scoring precision, like a trained run's evaluation.
    resolved = scoring_runtime(runtime_from_config(runtime), runtime.score_precision)
    base = load_base_model(model, device=resolved.device)
    log_probs, summary = few_shot_draws(
        base.model,
        base.tokenizer,
        train_qs,
        eval_qs,
        k=k,
        draws=draws,
        seed=seed,
        runtime=resolved,
        max_length=max_length,
        batch_size=runtime.eval_batch_size,
        progress=runtime.progress,
        scoring=scoring,
        normalization=normalization,
    )
    result = FewShotResult(**summary, task=data.task, model=model, eval_questions=len(eval_qs))
    return FewShotScores(eval_qs, log_probs, result)


__all__ = [
    "ANSWER_CLOSE",
    "DEMO_SEPARATOR",
    "FewShotEncoding",
    "FewShotPrompt",
    "FewShotScores",
    "base_model_as_ensemble",
    "demonstration_text",
    "encode_few_shot",
    "few_shot_draws",
    "few_shot_prompts",
    "run_few_shot",
    "score_few_shot",
]
