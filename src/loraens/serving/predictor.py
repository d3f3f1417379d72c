"""The server's per-question answer: the same scoring and the same rows as `loraens predict`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loraens.config import ModelConfig
from loraens.data.prompts import LETTERS, PromptTooLongError, encode_questions
from loraens.data.records import Question
from loraens.decisions.conformal import Score
from loraens.decisions.run import RunDecisions, apply_decisions, calibrated_ensemble
from loraens.evaluation.evaluate import score_questions
from loraens.evaluation.predictions import answer_rows
from loraens.rundir.load import LoadedEnsemble

ENSEMBLE_KEY = "_ensemble_log_probs"


@dataclass
class Predictor:
    """Answers a batch of questions in one call (run on the batcher's worker thread).

    ``members_per_pass=None`` scores every member in one stacked pass; 1 runs them one after
    another (the naive server of the load test). Either way the answers agree within float
    tolerance with `loraens predict` on the same questions.
    """

    loaded: LoadedEnsemble
    decisions: RunDecisions | None = None
    batch_size: int = 32
    members_per_pass: int | None = None

    def __call__(self, questions: list[Question]) -> list[dict]:
        member_log_probs = score_questions(
            self.loaded,
            questions,
            batch_size=self.batch_size,
            members_per_pass=self.members_per_pass,
        )
        rows = answer_rows(questions, member_log_probs)
        if self.decisions is not None:
            ensemble = calibrated_ensemble(member_log_probs, self.decisions.temperatures)
            apply_decisions(rows, questions, ensemble, self.decisions)
            # Unrounded, for the request's own max_risk / coverage (see decide); never sent.
            for row, x in zip(rows, ensemble, strict=True):
                row[ENSEMBLE_KEY] = x
        return rows

    def decide(
        self,
        rows: list[dict],
        questions: list[Question],
        *,
        max_risk: float | None = None,
        coverage: float | None = None,
        score: Score = "lac",
    ) -> None:
        """A request's abstention and conformal sets, exactly as `loraens predict` decides
        them; drops the rows' internal log-probs either way."""
        ensemble = [row.pop(ENSEMBLE_KEY, None) for row in rows]
        if max_risk is None and coverage is None:
            return
        if self.decisions is None:
            raise ValueError("this run has no calibration (held-out questions)")
        apply_decisions(
            rows, questions, np.stack(ensemble), self.decisions,
            max_risk=max_risk, coverage=coverage, score=score,
        )  # fmt: skip

    def check_length(self, q: Question) -> None:
        """Raise PromptTooLongError when a question cannot be scored at the run's max_length
        (its choices alone are too long; a long question text is shortened, as in predict),
        encoded as the run scores: by letter or by answer text."""
        model = self.loaded.model_config or ModelConfig()
        encode_questions(
            self.loaded.base.tokenizer, [q], self.loaded.max_length, model.scoring,
            model.normalization,
        )  # fmt: skip


def mark_correct(rows: list[dict], questions: list[Question]) -> None:
    """Add the given answer and whether the ensemble's prediction matches it, for the questions
    sent with one (a line of a labelled questions file, sent as is). Done after scoring, from
    the rows alone, so an answer can never change the probabilities."""
    for row, q in zip(rows, questions, strict=True):
        if q.answer is not None:
            row["answer"] = q.answer
            row["answer_letter"] = LETTERS[q.answer]
            row["correct"] = row["prediction"] == q.answer


__all__ = ["Predictor", "PromptTooLongError", "mark_correct"]
