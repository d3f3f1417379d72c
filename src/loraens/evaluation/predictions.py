"""predictions.jsonl: per question, every member's probabilities and the ensemble's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loraens.data.records import Question
from loraens.evaluation.metrics import ensemble_log_probs
from loraens.io import write_jsonl_atomic


def probability_rows(questions: list[Question], member_log_probs: np.ndarray) -> list[dict]:
    """Per-question records of every member's probabilities and the ensemble's."""
    ensemble = np.exp(ensemble_log_probs(member_log_probs))
    members = np.exp(member_log_probs)
    rows = []
    for i, q in enumerate(questions):
        k = len(q.choices)
        member_probs = members[:, i, :k]
        top = member_probs.argmax(axis=1)
        rows.append(
            {
                "id": q.id,
                "answer": q.answer,
                "prediction": int(ensemble[i, :k].argmax()),
                "ensemble_probs": ensemble[i, :k].round(6).tolist(),
                "member_probs": member_probs.round(6).tolist(),
                # Share of members whose top choice differs from the ensemble's: the
                # disagreement a user can act on (0 = unanimous).
                "disagreement": float(np.mean(top != ensemble[i, :k].argmax())),
            }
        )
    return rows


def write_predictions(path: Path, questions: list[Question], member_log_probs: np.ndarray):
    write_jsonl_atomic(path, probability_rows(questions, member_log_probs))
