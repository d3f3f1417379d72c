"""The one record every data source produces: a multiple-choice question."""

from __future__ import annotations

from dataclasses import dataclass

MIN_CHOICES = 2
MAX_CHOICES = 10  # one lowercase letter per option, "a".."j"


@dataclass(frozen=True)
class Question:
    """A multiple-choice question.

    ``answer`` is the index of the correct choice, or ``None`` for unlabeled questions that are
    only ever predicted on.
    """

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int | None
