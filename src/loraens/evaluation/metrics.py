"""Calibration, accuracy and uncertainty metrics on the normalized task distribution p_T.

Conventions shared by every function here:

- ``log_probs`` is a float array of shape (N, K_max): row ``i`` is ``log p_T(· | x_i)`` over the
  question's own options. Questions have different option counts, so rows are padded with
  ``-inf`` (probability 0) past the question's last option.
- ``member_log_probs`` stacks such arrays per ensemble member: shape (M, N, K_max), with the
  same padding in every member.
- ``labels`` is an integer array of shape (N,) holding the index of the correct option.

Everything is computed in float64. Padding never produces NaN: wherever ``p · log p`` or
``x - max`` would meet ``-inf``, masked operations are used instead (0 · log 0 = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ReliabilityBins",
    "accuracy",
    "ECE_BINS",
    "auroc",
    "brier",
    "confidence_bin",
    "disagreement",
    "ece",
    "ensemble_log_probs",
    "max_prob",
    "mutual_information",
    "nll",
    "normalize_label_log_probs",
    "predictive_entropy",
    "reliability_bins",
    "summarize",
    "wrong_confidence",
]

FloatArray = NDArray[np.float64]

ECE_BINS = 15  # the paper's (and torchmetrics') number of equal-width confidence bins


# ----------------------------------------------------------------------------- input checks


def _as_log_probs(log_probs: ArrayLike) -> FloatArray:
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2 or lp.shape[0] == 0 or lp.shape[1] == 0:
        raise ValueError(f"log_probs must have shape (N, K) with N, K >= 1, got {lp.shape}")
    if np.isnan(lp).any():
        raise ValueError("log_probs contains NaN")
    return lp


def _as_member_log_probs(member_log_probs: ArrayLike) -> FloatArray:
    lp = np.asarray(member_log_probs, dtype=np.float64)
    if lp.ndim != 3 or 0 in lp.shape:
        raise ValueError(
            f"member_log_probs must have shape (M, N, K) with M, N, K >= 1, got {lp.shape}"
        )
    if np.isnan(lp).any():
        raise ValueError("member_log_probs contains NaN")
    return lp


def _as_labels(labels: ArrayLike, lp: FloatArray) -> NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != lp.shape[0]:
        raise ValueError(f"labels must have shape ({lp.shape[0]},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if (y < 0).any() or (y >= lp.shape[1]).any():
        raise ValueError(f"labels must lie in [0, {lp.shape[1]})")
    return y.astype(np.int64)


# ----------------------------------------------------------------------------- p_T and ensembles


def _logsumexp(x: FloatArray, axis: int) -> FloatArray:
    """log Σ exp(x) along ``axis``; a slice that is all ``-inf`` gives ``-inf``, never NaN."""
    m = np.max(x, axis=axis, keepdims=True)
    # Shifting by -inf would give (-inf) - (-inf) = NaN; shift all-padding slices by 0 instead.
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf is the right answer for all-padding slices
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def normalize_label_log_probs(label_logits: ArrayLike, n_choices: ArrayLike) -> FloatArray:
    """Log of the normalized task distribution p_T (Eq. 1) from the label tokens' raw logits.

    ``label_logits`` (N, K_max) holds the model's logits for the letters "a", "b", ... at the
    answer position; ``n_choices`` (N,) is each question's option count. p_T is the softmax
    over the question's own letters only (the full-vocabulary normalizer cancels), so columns
    ``j >= n_choices[i]`` are ignored whatever they hold and come back as ``-inf``.
    """
    logits = np.asarray(label_logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"label_logits must have shape (N, K) with N, K >= 1, got {logits.shape}")
    n = np.asarray(n_choices)
    if n.shape != (logits.shape[0],) or not np.issubdtype(n.dtype, np.integer):
        raise ValueError(f"n_choices must be an integer array of shape ({logits.shape[0]},)")
    if (n < 1).any() or (n > logits.shape[1]).any():
        raise ValueError(f"n_choices must lie in [1, {logits.shape[1]}]")
    valid = np.arange(logits.shape[1])[None, :] < n[:, None]
    if np.isnan(logits[valid]).any() or np.isposinf(logits[valid]).any():
        raise ValueError("label_logits contains NaN or +inf in a real option")
    masked = np.where(valid, logits, -np.inf)
    return masked - _logsumexp(masked, axis=1)[:, None]


def ensemble_log_probs(member_log_probs: ArrayLike) -> FloatArray:
    """Log of the ensemble's predictive distribution (Eq. 2): (M, N, K) -> (N, K).

    The ensemble averages the members' *probabilities*, ``p_ens = (1/M) Σ_m p_m``, computed as
    ``logsumexp_m(log p_m) - log M``. This is deliberately not a mean of logits, which is a
    different, worse-calibrated estimator.
    """
    lp = _as_member_log_probs(member_log_probs)
    return _logsumexp(lp, axis=0) - np.log(lp.shape[0])


# ----------------------------------------------------------------------------- point metrics


def accuracy(log_probs: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of questions whose most probable option is the true one (ties: lowest index)."""
    lp = _as_log_probs(log_probs)
    y = _as_labels(labels, lp)
    return float(np.mean(np.argmax(lp, axis=1) == y))


def nll(log_probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean negative log-likelihood ``-log p_T(y | x)`` of the true option (``inf`` if p = 0)."""
    lp = _as_log_probs(log_probs)
    y = _as_labels(labels, lp)
    return float(-np.mean(lp[np.arange(lp.shape[0]), y]))


def wrong_confidence(log_probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean top-label confidence over the questions answered wrongly (Fig. 1a's quantity: high
    means confidently wrong); NaN when every answer is right."""
    lp = _as_log_probs(log_probs)
    y = _as_labels(labels, lp)
    wrong = np.argmax(lp, axis=1) != y
    return float(np.mean(np.exp(np.max(lp[wrong], axis=1)))) if wrong.any() else math.nan


def brier(log_probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean over questions of ``Σ_k (p_k - 1[k = y])²`` over the question's options.

    Padded options have p = 0 and are never the label, so they add nothing; the score lies
    in [0, 2].
    """
    lp = _as_log_probs(log_probs)
    y = _as_labels(labels, lp)
    onehot = np.zeros_like(lp)
    onehot[np.arange(lp.shape[0]), y] = 1.0
    return float(np.mean(np.sum((np.exp(lp) - onehot) ** 2, axis=1)))


# ----------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of top-label confidence, one entry per bin (arrays of length n_bins).

    Bin ``i`` covers ``[lower[i], upper[i])``, compared in float64 (a confidence exactly on an
    edge belongs to the bin above it); the last bin is closed at 1.0. For an empty bin
    ``count`` is 0 and ``confidence`` / ``accuracy`` are 0.0 (not NaN): check ``count`` before
    plotting.
    """

    lower: FloatArray
    upper: FloatArray
    count: NDArray[np.int64]
    confidence: FloatArray  # mean top-label confidence of the bin's questions
    accuracy: FloatArray  # fraction of the bin's questions predicted correctly

    @property
    def n_bins(self) -> int:
        return int(self.count.shape[0])


def _bin_edges(n_bins: int) -> FloatArray:
    return np.linspace(0.0, 1.0, n_bins + 1)


def confidence_bin(confidence: ArrayLike, n_bins: int = ECE_BINS) -> NDArray[np.int64]:
    """The equal-width bin (0 .. n_bins - 1) of each top-label confidence in [0, 1].

    Float64 edges and float64 confidences: bin k is [edges[k], edges[k+1]), so a confidence
    exactly on an edge falls in the bin above it, and 1.0 falls in the last bin (clipped).
    torchmetrics differs at exact edges (see ece), not elsewhere.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = np.asarray(confidence, dtype=np.float64)
    idx = np.searchsorted(_bin_edges(n_bins), conf, side="right") - 1
    return np.clip(idx, 0, n_bins - 1).astype(np.int64)


def reliability_bins(
    log_probs: ArrayLike, labels: ArrayLike, n_bins: int = ECE_BINS
) -> ReliabilityBins:
    """Bin questions by top-label confidence into ``n_bins`` equal-width bins on [0, 1].

    ``ece`` and the reliability diagrams use it; the bins themselves are :func:`confidence_bin`.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    lp = _as_log_probs(log_probs)
    y = _as_labels(labels, lp)
    conf = np.exp(np.max(lp, axis=1))
    correct = (np.argmax(lp, axis=1) == y).astype(np.float64)
    idx = confidence_bin(conf, n_bins)
    edges = _bin_edges(n_bins)

    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    safe = np.maximum(count, 1)  # empty bins: 0 / 1 = 0 rather than 0 / 0 = NaN
    return ReliabilityBins(
        lower=edges[:-1],
        upper=edges[1:],
        count=count,
        confidence=conf_sum / safe,
        accuracy=correct_sum / safe,
    )


def ece(log_probs: ArrayLike, labels: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: Σ_bins (n_b / N) · |acc_b − conf_b| (top-label, L1).

    Equal-width bins on [0, 1], each weighted by its share of the questions, binned as
    :func:`reliability_bins` does: float64 edges ``np.linspace(0, 1, n_bins + 1)``, float64
    confidences, bin k = [k/n, (k+1)/n), the last bin [(n-1)/n, 1].

    torchmetrics' ``multiclass_calibration_error(norm="l1")`` gives the same value (tested to
    1e-6) except at exact edges, because it bins in float32: it rounds confidences to float32,
    compares them with float32 ``torch.linspace`` edges, several of which are not the nearest
    float32 to k/15 (3/15 becomes 0.20000002, so a confidence of exactly 0.2 falls in bin 2
    there and bin 3 here), and puts a confidence that rounds to 1.0 in float32 (p >= 1 - 2^-25)
    in a bin of its own. The results differ only for confidences within float32 rounding of an
    edge, or when such a 1.0 shares the last bin with answers whose calibration gap has the
    opposite sign.
    """
    bins = reliability_bins(log_probs, labels, n_bins)
    weight = bins.count / bins.count.sum()
    return float(np.sum(weight * np.abs(bins.accuracy - bins.confidence)))


# ----------------------------------------------------------------------------- uncertainty and OOD


def _entropy(lp: FloatArray) -> FloatArray:
    """Entropy over the last axis, with 0 · log 0 = 0 for padded / zero-probability options."""
    # exp(-inf) = 0, and the inner where keeps that 0 from meeting -inf (0 · -inf = NaN).
    plogp = np.exp(lp) * np.where(np.isfinite(lp), lp, 0.0)
    return -np.sum(plogp, axis=-1)


def predictive_entropy(log_probs: ArrayLike) -> FloatArray:
    """Per-question entropy ``-Σ_k p_k log p_k`` (nats), shape (N,)."""
    return _entropy(_as_log_probs(log_probs))


def max_prob(log_probs: ArrayLike) -> FloatArray:
    """Per-question top-label confidence ``max_k p_k``, shape (N,).

    The paper's OOD score is ``-max_prob`` (higher = more likely out of distribution).
    """
    return np.exp(np.max(_as_log_probs(log_probs), axis=1))


def mutual_information(member_log_probs: ArrayLike) -> FloatArray:
    """Per-question epistemic uncertainty: H[ensemble mean] − mean_m H[member m], shape (N,).

    Non-negative by concavity of entropy (up to float rounding, so tiny negatives of order
    1e-16 can occur); zero when all members agree.
    """
    lp = _as_member_log_probs(member_log_probs)
    return _entropy(ensemble_log_probs(lp)) - np.mean(_entropy(lp), axis=0)


def disagreement(member_log_probs: ArrayLike) -> FloatArray:
    """Per-question share of members whose top option differs from the ensemble's, shape (N,):
    0 when every member picks the ensemble's answer (ties: lowest index, as in accuracy)."""
    lp = _as_member_log_probs(member_log_probs)
    ensemble_top = np.argmax(ensemble_log_probs(lp), axis=1)
    return np.mean(np.argmax(lp, axis=2) != ensemble_top, axis=0)


def auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the ROC curve for telling OOD (positive class) from in-distribution.

    Higher scores must mean "more OOD" (e.g. ``-max_prob``). Computed as the Mann–Whitney
    statistic P(s_out > s_in) + ½ P(s_out = s_in), from average ranks so ties count half.
    """
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("auroc needs at least one in-distribution and one OOD score")
    scores = np.concatenate([s_in, s_out])
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")

    # Average 1-based ranks: a tied group occupying positions start+1 .. start+c gets their mean.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts
    ranks = (start + (counts + 1) / 2.0)[inverse]

    n_out = s_out.size
    u = np.sum(ranks[s_in.size :]) - n_out * (n_out + 1) / 2.0
    return float(u / (s_in.size * n_out))


# ----------------------------------------------------------------------------- summary


def summarize(log_probs: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The paper's headline metrics as python floats: accuracy, nll, ece (15 bins), brier."""
    return {
        "accuracy": accuracy(log_probs, labels),
        "nll": nll(log_probs, labels),
        "ece": ece(log_probs, labels),
        "brier": brier(log_probs, labels),
    }
