"""predictions.jsonl: per question, every member's probabilities and the ensemble's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loraens.data.prompts import LETTERS
from loraens.data.records import Question
from loraens.evaluation.metrics import (
    disagreement,
    ensemble_log_probs,
    mutual_information,
    predictive_entropy,
)
from loraens.io import write_jsonl_atomic


def probability_rows(questions: list[Question], member_log_probs: np.ndarray) -> list[dict]:
    """Per-question records of every member's probabilities and the ensemble's."""
    ensemble = np.exp(ensemble_log_probs(member_log_probs))
    members = np.exp(member_log_probs)
    # The disagreement a user can act on (0 = unanimous).
    disagree = disagreement(member_log_probs)
    rows = []
    for i, q in enumerate(questions):
        k = len(q.choices)
        rows.append(
            {
                "id": q.id,
                "answer": q.answer,
                "prediction": int(ensemble[i, :k].argmax()),
                "ensemble_probs": ensemble[i, :k].round(6).tolist(),
                "member_probs": members[:, i, :k].round(6).tolist(),
                "disagreement": float(disagree[i]),
            }
        )
    return rows


def answer_rows(questions: list[Question], member_log_probs: np.ndarray) -> list[dict]:
    """What `loraens predict` and `loraens serve` answer per question: the predicted option
    (index, letter, text), its probability, the ensemble's and every member's probabilities,
    disagreement, predictive entropy and mutual information (nats)."""
    entropy = predictive_entropy(ensemble_log_probs(member_log_probs))
    info = mutual_information(member_log_probs)
    scored = probability_rows(questions, member_log_probs)
    rows = []
    for i, (q, row) in enumerate(zip(questions, scored, strict=True)):
        k = row["prediction"]
        rows.append(
            {
                "id": row["id"],
                "prediction": k,
                "letter": LETTERS[k],
                "text": q.choices[k],
                "probability": row["ensemble_probs"][k],
                "disagreement": row["disagreement"],
                "entropy": round(float(entropy[i]), 6),
                # clipped: float rounding can leave -1e-16 where members agree exactly
                "mutual_information": round(max(float(info[i]), 0.0), 6),
                "ensemble_probs": row["ensemble_probs"],
                "member_probs": row["member_probs"],
            }
        )
    return rows


def write_predictions(path: Path, questions: list[Question], member_log_probs: np.ndarray):
    write_jsonl_atomic(path, probability_rows(questions, member_log_probs))
