"""Temperature scaling (Guo et al. 2017) of p_T, fitted on held-out questions.

A temperature T rescales a question's log-probabilities, ``p_T ∝ exp(log p / T)``, which is
the softmax of the label logits divided by T (p_T's normaliser cancels). T > 1 softens an
over-confident model, T < 1 sharpens an under-confident one; the argmax, hence accuracy, never
changes.

loraens fits one T per member (each member is scaled before it is averaged, the rows
"single + TS") and one T on the ensemble's averaged distribution ("ensemble + TS"), each by
minimising the held-out NLL. With β = 1/T the NLL is a log-sum-exp of functions linear in β
minus a linear term, so it is convex in β; T = 1/β is monotone, so the NLL is unimodal in
log T and a golden-section search on log T over [1/100, 100] finds its minimum without
derivatives or a solver dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from loraens.evaluation.metrics import ensemble_log_probs, nll

__all__ = [
    "LOG_T_BOUNDS",
    "Temperatures",
    "fit_temperature",
    "fit_temperatures",
    "scale_log_probs",
]

LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))
_GOLDEN = (math.sqrt(5) - 1) / 2
_TOLERANCE = 1e-7  # in log T: T to 7 significant digits


def scale_log_probs(log_probs: ArrayLike, temperature: float) -> np.ndarray:
    """log p_T rescaled by ``temperature`` over the last axis; padding (-inf) stays -inf."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    lp = np.asarray(log_probs, dtype=np.float64) / temperature
    top = np.max(lp, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        norm = np.log(np.sum(np.exp(lp - top), axis=-1, keepdims=True)) + top
    return lp - norm


def fit_temperature(log_probs: ArrayLike, labels: ArrayLike) -> float:
    """The T in [1/100, 100] minimising the NLL of ``scale_log_probs(log_probs, T)``.

    ``log_probs`` is (N, K) (padded with -inf), ``labels`` (N,). A model that is right with
    ever more confidence pushes T to the lower bound, one that is uniformly wrong to the upper.
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    y = np.asarray(labels)
    if lp.ndim != 2 or lp.shape[0] == 0:
        raise ValueError(f"log_probs must have shape (N, K) with N >= 1, got {lp.shape}")

    def loss(log_t: float) -> float:
        return nll(scale_log_probs(lp, math.exp(log_t)), y)

    lo, hi = LOG_T_BOUNDS
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > _TOLERANCE:
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = loss(b)
    # The bounds themselves are candidates: golden section never evaluates them.
    candidates = [(fa, a), (fb, b), (loss(LOG_T_BOUNDS[0]), LOG_T_BOUNDS[0])]
    candidates.append((loss(LOG_T_BOUNDS[1]), LOG_T_BOUNDS[1]))
    return math.exp(min(candidates)[1])


@dataclass(frozen=True)
class Temperatures:
    """One temperature per member and one for the ensemble's averaged distribution."""

    members: tuple[float, ...]
    ensemble: float

    def members_scaled(self, member_log_probs: ArrayLike) -> np.ndarray:
        """(M, N, K): member m rescaled by its own T ("single + TS")."""
        lp = np.asarray(member_log_probs, dtype=np.float64)
        if lp.ndim != 3 or lp.shape[0] != len(self.members):
            raise ValueError(
                f"expected (M={len(self.members)}, N, K) member log-probs, got {lp.shape}"
            )
        return np.stack([scale_log_probs(x, t) for x, t in zip(lp, self.members, strict=True)])

    def ensemble_scaled(self, member_log_probs: ArrayLike) -> np.ndarray:
        """(N, K): the members' average (unscaled members) rescaled by the ensemble's T."""
        return scale_log_probs(ensemble_log_probs(member_log_probs), self.ensemble)


def fit_temperatures(member_log_probs: ArrayLike, labels: ArrayLike) -> Temperatures:
    """Every member's T and the ensemble's, each minimising its held-out NLL."""
    lp = np.asarray(member_log_probs, dtype=np.float64)
    if lp.ndim != 3:
        raise ValueError(f"member_log_probs must have shape (M, N, K), got {lp.shape}")
    return Temperatures(
        members=tuple(fit_temperature(x, labels) for x in lp),
        ensemble=fit_temperature(ensemble_log_probs(lp), labels),
    )
