"""Turn a DataConfig into the train and eval question lists of a run."""

from __future__ import annotations

import random

from loraens.config import DataConfig
from loraens.data.files import load_questions_file
from loraens.data.records import Question
from loraens.data.tasks import TASKS, load_task

DEFAULT_FILE_BATCH_SIZE = 16


def subset(questions: list[Question], limit: int | None, seed: int) -> list[Question]:
    """A seeded random subset of at most ``limit`` questions (all of them for None)."""
    if limit is None or limit >= len(questions):
        return list(questions)
    return random.Random(seed).sample(list(questions), limit)


def load_run_data(cfg: DataConfig) -> tuple[list[Question], list[Question]]:
    """(train, eval) questions: the task's splits, either replaced by the user's files."""
    if cfg.task is None and (cfg.train_file is None or cfg.eval_file is None):
        raise ValueError("Give data.task, or both data.train_file and data.eval_file.")
    train, evaluation = load_task(cfg.task) if cfg.task is not None else ([], [])
    if cfg.train_file is not None:
        train = load_questions_file(cfg.train_file)
    if cfg.eval_file is not None:
        evaluation = load_questions_file(cfg.eval_file)
    return (
        subset(train, cfg.train_limit, cfg.subset_seed),
        subset(evaluation, cfg.eval_limit, cfg.subset_seed + 1),
    )


def default_batch_size(cfg: DataConfig) -> int:
    """The paper's batch size for the task (cqa 32, obqa/arc 16, mmlu 8)."""
    if cfg.task is not None and cfg.train_file is None:
        return TASKS[cfg.task].paper_batch_size
    return DEFAULT_FILE_BATCH_SIZE


def split_holdout(
    questions: list[Question], fraction: float, seed: int
) -> tuple[list[Question], list[Question]]:
    """(fit, held out): a seeded share of the training questions set aside for early stopping."""
    n_holdout = max(1, round(len(questions) * fraction))
    shuffled = random.Random(seed).sample(list(questions), len(questions))
    return shuffled[n_holdout:], shuffled[:n_holdout]


def load_ood_questions(cfg: DataConfig) -> list[Question]:
    """The labelled OOD questions a run scores every evaluated epoch (none if not asked for)."""
    if cfg.ood_file is not None:
        questions = load_questions_file(cfg.ood_file)
    elif cfg.ood_task is not None:
        questions = list(load_task(cfg.ood_task)[1])
    else:
        return []
    return subset(questions, cfg.ood_limit, cfg.subset_seed + 2)
