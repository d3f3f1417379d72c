"""predictions.jsonl: per question, every member's probabilities and the ensemble's.

One JSON object per eval question, in the eval set's order::

    {"id": ..., "answer": 2, "prediction": 2, "disagreement": 0.0,
     "ensemble_probs": [0.1, 0.2, 0.7], "member_probs": [[...], ...],  # rounded to 6 decimals
     "ensemble_log_probs": [...], "member_log_probs": [[...], ...]}    # exact float64

The rounded probabilities are for reading. The log-probs are the float64 ``log p_T`` the run's
metrics were computed from, over the question's own options (``member_log_probs`` is M x K):
json writes a float's shortest repr, which reads back bit-identical, so the file alone
reproduces every member's, the mean member's and the ensemble's metrics in ``summary.json``
(the "+ TS" rows also need calibration.json's temperatures). The rounded numbers cannot: a
probability below 5e-7 is stored as 0. Files written before the log-probs were added hold only
the rounded probabilities; readers fall back to those.
"""

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
    """Per-question records of every member's probabilities and the ensemble's, rounded and
    as exact log-probs (see the module docstring)."""
    member_log_probs = np.asarray(member_log_probs, dtype=np.float64)
    ensemble_lp = ensemble_log_probs(member_log_probs)
    ensemble = np.exp(ensemble_lp)
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
                "ensemble_log_probs": ensemble_lp[i, :k].tolist(),
                "member_log_probs": member_log_probs[:, i, :k].tolist(),
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


def write_predictions(path: Path, questions: list[Question], member_log_probs: np.ndarray) -> None:
    """Write ``predictions.jsonl`` (see the module docstring) for (M, N, K) log-probs."""
    write_jsonl_atomic(path, probability_rows(questions, member_log_probs))
