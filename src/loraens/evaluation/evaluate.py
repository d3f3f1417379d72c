"""`loraens evaluate` and `loraens predict`: score a trained run's saved members."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from loraens.config import ModelConfig
from loraens.data.files import load_questions_file
from loraens.data.prompts import encode_questions, scoring_label_ids
from loraens.data.records import Question
from loraens.data.tasks import load_task
from loraens.evaluation.inference import score_members
from loraens.evaluation.predictions import answer_rows
from loraens.evaluation.tables import metric_rows, single_vs_ensemble
from loraens.io import write_jsonl_atomic
from loraens.rundir.load import LoadedEnsemble


def score_questions(
    loaded: LoadedEnsemble,
    questions: Sequence[Question],
    *,
    batch_size: int = 32,
    members_per_pass: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Every member's log p_T on ``questions``: (members, questions, max options).

    ``members_per_pass`` (None: all members in one stacked pass) only changes how the work is
    shaped, never the numbers beyond float tolerance."""
    tokenizer = loaded.base.tokenizer
    model = loaded.model_config or ModelConfig()
    n_letters = max(len(q.choices) for q in questions)
    label_ids = torch.tensor(
        scoring_label_ids(tokenizer, n_letters, model.scoring), dtype=torch.long
    )
    encoded = encode_questions(
        tokenizer, list(questions), loaded.max_length, model.scoring, model.normalization
    )
    label_ids = label_ids.to(loaded.runtime.device)
    if loaded.predictive is not None:
        return loaded.predictive(encoded, label_ids, batch_size=batch_size, progress=progress)
    return score_members(
        loaded.ensemble,
        encoded,
        label_ids,
        loaded.runtime,
        batch_size=batch_size,
        members_per_pass=members_per_pass,
        mc_dropout_passes=loaded.mc_dropout_passes,
        progress=progress,
    )


def evaluate_run(
    loaded: LoadedEnsemble,
    questions: list[Question],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Metric rows (per member and ensemble) and the single-vs-ensemble table."""
    if any(q.answer is None for q in questions):
        raise ValueError("Evaluation needs an answer for every question; use predict instead.")
    member_log_probs = score_questions(loaded, questions, batch_size=batch_size, progress=progress)
    rows = metric_rows(member_log_probs, np.asarray([q.answer for q in questions]), split="eval")
    return rows, single_vs_ensemble(rows)


def predict_file(
    loaded: LoadedEnsemble,
    questions: list[Question],
    output: Path,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict]:
    """Write one JSONL line per question (see :func:`answer_rows`)."""
    member_log_probs = score_questions(loaded, questions, batch_size=batch_size, progress=progress)
    rows = answer_rows(questions, member_log_probs)
    write_jsonl_atomic(output, rows)
    return rows


def questions_for(task: str | None, file: str | None, require_answer: bool) -> list[Question]:
    """The eval split of a task, or the questions of a user's file (exactly one of the two)."""
    if (task is None) == (file is None):
        raise ValueError("Give exactly one of --task or --file.")
    if task is not None:
        return load_task(task)[1]
    assert file is not None  # exactly one of the two, checked above
    return load_questions_file(file, require_answer=require_answer)
