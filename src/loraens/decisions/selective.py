"""Selective prediction: answer the questions the model is most sure of, abstain on the rest.

Conventions (Geifman & El-Yaniv 2017; Ding et al. 2020 for E-AURC):

- A *confidence* per question ranks the questions; answering those with confidence >= t has
  *coverage* (share answered) and *selective risk* (error rate among the answered).
- The risk–coverage curve has one point per distinct confidence, from the most confident down:
  tied questions are answered or withheld together, so ties never depend on question order.
- AURC is the area under that step curve: Σ_t risk(t) · Δcoverage(t). Without ties it is the
  mean over k = 1..N of the error rate of the k most confident answers.
- E-AURC = AURC − AURC of the ideal ranking (every right answer before every wrong one), the
  exact finite-N value (1/N) Σ_{k > n_right} (k − n_right) / k rather than its continuous limit.

Uncertainty scores for misclassification detection reuse :mod:`loraens.evaluation.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from loraens.evaluation.metrics import auroc, ensemble_log_probs, max_prob

__all__ = [
    "COVERAGES",
    "RiskCoverage",
    "SelectiveThreshold",
    "accuracy_at_coverage",
    "aurc",
    "choose_threshold",
    "e_aurc",
    "misclassification_auroc",
    "risk_coverage",
    "selective_summary",
]

COVERAGES = (0.5, 0.8, 0.9)


def _inputs(confidence: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if c.size == 0 or c.shape != ok.shape:
        raise ValueError(f"need one confidence per answer, got {c.shape} and {ok.shape}")
    if np.isnan(c).any():
        raise ValueError("confidence contains NaN")
    return c, ok


@dataclass(frozen=True)
class RiskCoverage:
    """The curve's points, most confident first: threshold, coverage and risk at each."""

    thresholds: np.ndarray
    coverage: np.ndarray
    risk: np.ndarray


def risk_coverage(confidence: ArrayLike, correct: ArrayLike) -> RiskCoverage:
    """One point per distinct confidence t: answer every question with confidence >= t."""
    c, ok = _inputs(confidence, correct)
    thresholds, counts = np.unique(-c, return_counts=True)  # descending confidence
    order = np.argsort(-c, kind="stable")
    errors = np.cumsum(~ok[order])[np.cumsum(counts) - 1]
    answered = np.cumsum(counts)
    return RiskCoverage(-thresholds, answered / c.size, errors / answered)


def aurc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Area under the risk–coverage step curve (lower is better)."""
    curve = risk_coverage(confidence, correct)
    steps = np.diff(np.concatenate([[0.0], curve.coverage]))
    return float(np.sum(curve.risk * steps))


def e_aurc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """AURC minus that of the ideal ranking of the same answers (0 = perfect ranking)."""
    c, ok = _inputs(confidence, correct)
    n, right = c.size, int(ok.sum())
    k = np.arange(right + 1, n + 1)
    ideal = float(np.sum((k - right) / k) / n)
    return aurc(c, ok) - ideal


def accuracy_at_coverage(confidence: ArrayLike, correct: ArrayLike, coverage: float) -> float:
    """Accuracy of the ceil(coverage · N) most confident answers (ties: earlier question)."""
    c, ok = _inputs(confidence, correct)
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    k = max(1, math.ceil(coverage * c.size - 1e-9))
    return float(ok[np.argsort(-c, kind="stable")[:k]].mean())


def misclassification_auroc(uncertainty: ArrayLike, correct: ArrayLike) -> float:
    """AUROC of telling wrong answers (positives) from right ones by ``uncertainty`` (higher =
    more likely wrong); NaN when every answer is right or every answer is wrong."""
    u, ok = _inputs(uncertainty, correct)
    if ok.all() or not ok.any():
        return math.nan
    return auroc(u[ok], u[~ok])


@dataclass(frozen=True)
class SelectiveThreshold:
    """The confidence threshold chosen on held-out questions for a target risk."""

    threshold: float
    """Answer when the confidence is >= this (inf: abstain on everything)."""
    max_risk: float
    coverage: float
    """Share of the held-out questions answered at this threshold (the expected coverage)."""
    risk: float
    """Their error rate (NaN when none is answered)."""


def choose_threshold(
    confidence: ArrayLike, correct: ArrayLike, max_risk: float
) -> SelectiveThreshold:
    """The lowest threshold whose held-out selective risk is at most ``max_risk`` (the largest
    coverage meeting it). An empirical choice: the risk on new questions scatters around it."""
    if not 0 <= max_risk <= 1:
        raise ValueError(f"max_risk must be in [0, 1], got {max_risk}")
    curve = risk_coverage(confidence, correct)
    meets = np.flatnonzero(curve.risk <= max_risk + 1e-12)
    if meets.size == 0:
        return SelectiveThreshold(math.inf, max_risk, 0.0, math.nan)
    i = meets[-1]
    return SelectiveThreshold(
        float(curve.thresholds[i]), max_risk, float(curve.coverage[i]), float(curve.risk[i])
    )


def selective_summary(member_log_probs: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The ensemble's selective-prediction figures: AURC and E-AURC by max p, accuracy at
    50/80/90% coverage, and misclassification AUROC by −max p, entropy and mutual
    information."""
    lp = np.asarray(member_log_probs, dtype=np.float64)
    ens = ensemble_log_probs(lp)
    correct = ens.argmax(axis=1) == np.asarray(labels)
    confidence = max_prob(ens)
    out = {"aurc": aurc(confidence, correct), "e_aurc": e_aurc(confidence, correct)}
    for cov in COVERAGES:
        out[f"accuracy@{int(cov * 100)}"] = accuracy_at_coverage(confidence, correct, cov)
    # The OOD module's scores (higher = less sure), MI rounded so agreeing members tie exactly.
    # Imported here: that module loads torch, which the report (a user of this one) never needs.
    from loraens.evaluation.ood import ood_scores

    scores = ood_scores(lp)
    for name, key in (("max_prob", "neg_max_prob"), ("entropy", "entropy")):
        out[f"misclass_auroc_{name}"] = misclassification_auroc(scores[key], correct)
    out["misclass_auroc_mi"] = misclassification_auroc(scores["mutual_information"], correct)
    return out
