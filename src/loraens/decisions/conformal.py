"""Split conformal answer sets (Vovk et al.; Angelopoulos & Bates 2021) from p_T.

Calibrate on n held-out questions: score each by how badly the model rates its true option,
take q̂, the ⌈(n + 1)(1 − α)⌉-th smallest score, and answer a new question with every option
whose score would be <= q̂. When held-out and new questions are exchangeable the set holds the
true option with probability at least 1 − α (and below 1 − α + 1/(n + 1) without ties).

Two scores:

- ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): 1 − p_y. Smallest sets
  on average; a very sure model may get an empty set for a question it finds hard to place.
- ``aps`` (adaptive prediction sets, Romano et al. 2020), non-randomised: the total probability
  of the options at least as probable as y, p_y included. An option's set membership is the same
  rule, so sets grow with the model's uncertainty and are never empty once q̂ >= max p.

Padded options (log p = -inf) are never in a set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "SCORES",
    "ConformalSets",
    "conformal_quantile",
    "conformal_sets",
    "option_scores",
    "prediction_sets",
    "true_option_scores",
]

Score = Literal["lac", "aps"]
SCORES: tuple[Score, ...] = ("lac", "aps")


def option_scores(log_probs: ArrayLike, score: Score) -> np.ndarray:
    """(N, K) nonconformity of every option as if it were the answer; +inf on padding."""
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must have shape (N, K), got {lp.shape}")
    p = np.exp(lp)
    real = np.isfinite(lp)
    if score == "lac":
        out = 1.0 - p
    elif score == "aps":
        # Mass of every option at least as probable as option k (ties all count).
        out = np.sum(np.where(p[:, None, :] >= p[:, :, None], p[:, None, :], 0.0), axis=2)
    else:
        raise ValueError(f"unknown conformal score {score!r}; choose from {SCORES}")
    return np.where(real, out, np.inf)


def true_option_scores(log_probs: ArrayLike, labels: ArrayLike, score: Score) -> np.ndarray:
    """(N,) nonconformity of each question's true option."""
    scores = option_scores(log_probs, score)
    y = np.asarray(labels, dtype=np.int64)
    return scores[np.arange(len(y)), y]


def conformal_quantile(calibration_scores: ArrayLike, alpha: float) -> float:
    """q̂: the ⌈(n + 1)(1 − α)⌉-th smallest score; +inf when that exceeds n (too few
    questions for 1 − α: every option goes in the set)."""
    s = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if s.size == 0:
        raise ValueError("conformal calibration needs at least one held-out question")
    rank = math.ceil((s.size + 1) * (1 - alpha) - 1e-9)
    return math.inf if rank > s.size else float(s[rank - 1])


def prediction_sets(log_probs: ArrayLike, q_hat: float, score: Score) -> np.ndarray:
    """(N, K) boolean membership: option k is in question i's set iff its score <= q̂."""
    scores = option_scores(log_probs, score)
    return np.isfinite(scores) & (scores <= q_hat)


@dataclass(frozen=True)
class ConformalSets:
    """Sets for one model at one target coverage, with what they achieved."""

    score: Score
    coverage_target: float
    q_hat: float
    sets: np.ndarray
    """(N, K) membership on the questions asked."""

    @property
    def mean_size(self) -> float:
        return float(self.sets.sum(axis=1).mean())

    def empirical_coverage(self, labels: ArrayLike) -> float:
        y = np.asarray(labels, dtype=np.int64)
        return float(self.sets[np.arange(len(y)), y].mean())


def conformal_sets(
    calibration_log_probs: ArrayLike,
    calibration_labels: ArrayLike,
    log_probs: ArrayLike,
    coverage: float = 0.9,
    score: Score = "lac",
) -> ConformalSets:
    """Calibrate on held-out (log-probs, labels) and build the sets of ``log_probs``."""
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    q_hat = conformal_quantile(
        true_option_scores(calibration_log_probs, calibration_labels, score), 1 - coverage
    )
    return ConformalSets(score, coverage, q_hat, prediction_sets(log_probs, q_hat, score))
