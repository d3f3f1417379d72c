"""The server's per-question answer: the same scoring and the same rows as `loraens predict`."""

from __future__ import annotations

from dataclasses import dataclass

from loraens.config import ModelConfig
from loraens.data.prompts import PromptTooLongError, encode_questions
from loraens.data.records import Question
from loraens.evaluation.evaluate import score_questions
from loraens.evaluation.predictions import answer_rows
from loraens.rundir.load import LoadedEnsemble


@dataclass
class Predictor:
    """Answers a batch of questions in one call (run on the batcher's worker thread).

    ``members_per_pass=None`` scores every member in one stacked pass; 1 runs them one after
    another (the naive server of the load test). Either way the answers agree within float
    tolerance with `loraens predict` on the same questions.
    """

    loaded: LoadedEnsemble
    batch_size: int = 32
    members_per_pass: int | None = None

    def __call__(self, questions: list[Question]) -> list[dict]:
        member_log_probs = score_questions(
            self.loaded,
            questions,
            batch_size=self.batch_size,
            members_per_pass=self.members_per_pass,
        )
        return self.decide(answer_rows(questions, member_log_probs), member_log_probs)

    def decide(self, rows: list[dict], member_log_probs) -> list[dict]:
        """Calibration hook: a calibrated run fills each row's ``calibrated_probs`` (and, on
        request, ``abstain`` and ``prediction_set``) here, from the unrounded log-probs.

        Uncalibrated runs answer the rows as they are: those fields stay absent (null).
        """
        return rows

    def check_length(self, q: Question) -> None:
        """Raise PromptTooLongError when a question cannot be scored at the run's max_length
        (its choices alone are too long; a long question text is shortened, as in predict),
        encoded as the run scores: by letter or by answer text."""
        model = self.loaded.model_config or ModelConfig()
        encode_questions(
            self.loaded.base.tokenizer, [q], self.loaded.max_length, model.scoring,
            model.normalization,
        )  # fmt: skip


__all__ = ["Predictor", "PromptTooLongError"]
