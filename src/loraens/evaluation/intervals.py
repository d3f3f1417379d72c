"""95% intervals on differences between models: a paired bootstrap over questions, and seeds.

A claim such as "the ensemble has a lower NLL than its mean member" is a difference A − B of a
metric on the same eval questions. Two sources of uncertainty are reported:

- over questions, a paired bootstrap: each resample draws N question indices with replacement
  and scores A and B on that same draw;
- over training seeds, the spread of the per-seed differences.

The runs of one setting share their eval questions, so each resample draws *one* set of indices
and applies it to every seed; its statistic is the mean over seeds of the per-seed difference.
The draws are exactly ``np.random.default_rng(seed).integers(0, N, size=(n_resamples, N))``
(row r is resample r), so a result can be reproduced outside this module.

The estimate is the statistic on all questions; the interval is the percentile interval of the
resampled statistics; a claim is *shown* when the interval excludes 0.

A *model* here is a stack of (N, K) log p_T arrays whose metric is averaged: one array for an
ensemble, the M members for "the mean single member", the D draws for few-shot. Resampled
scores are computed for every resample at once (see :func:`_resampled_scores`), not by a loop
over resamples: accuracy, NLL and Brier are means of per-question terms, and ECE is a sum over
bins of |Σ (correct − confidence)| / N, whose bins do not change under resampling.

The members' diversity (mutual information, disagreement) is a mean of per-question terms of
a model's member stack; its differences use the same draws (:func:`diversity_difference`).

OOD detection (:func:`auroc_interval`, :func:`auroc_difference`) scores two question sets, the
in-distribution one (N_in questions) and the OOD one (N_out); a resample draws the questions of
both, from one generator: ``rng = np.random.default_rng(seed)``, then
``rng.integers(0, N_in, size=(n_resamples, N_in))`` (the draws above, for the in-distribution
set) and ``rng.integers(0, N_out, size=(n_resamples, N_out))``. The AUROC of a resample is the
Mann–Whitney statistic over its drawn pairs (ties count half), computed from the drawn counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from loraens.evaluation import metrics
from loraens.evaluation.metrics import ECE_BINS, confidence_bin, ensemble_log_probs

__all__ = [
    "DEFAULT_RESAMPLES",
    "DIVERSITY_FUNCTIONS",
    "METRIC_FUNCTIONS",
    "Difference",
    "Interval",
    "auroc_difference",
    "auroc_interval",
    "diversity_difference",
    "ensemble_minus_single",
    "paired_difference",
]

DEFAULT_RESAMPLES = 2000
LEVEL = 0.95

FloatArray = NDArray[np.float64]

# The point metrics a difference can be taken of; the estimate on all questions uses these.
METRIC_FUNCTIONS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": metrics.accuracy,
    "nll": metrics.nll,
    "ece": metrics.ece,
    "brier": metrics.brier,
    "wrong_confidence": metrics.wrong_confidence,
}

# How much an ensemble's members differ, per question; a difference of their means over
# questions needs no labels (Fig. 2's "members stay alike" made a number).
DIVERSITY_FUNCTIONS: dict[str, Callable[[ArrayLike], FloatArray]] = {
    "mutual_information": metrics.mutual_information,
    "disagreement": metrics.disagreement,
}


class _SeedSpread:
    """The spread over seeds of a statistic's per-seed values (``per_seed``)."""

    per_seed: tuple[float, ...]

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def seed_mean(self) -> float:
        return float(np.mean(self.per_seed))

    @property
    def seed_sd(self) -> float:
        """Sample standard deviation (ddof 1) over seeds; NaN with one seed."""
        return float(np.std(self.per_seed, ddof=1)) if self.n_seeds > 1 else math.nan

    @property
    def seed_min(self) -> float:
        return float(np.min(self.per_seed))

    @property
    def seed_max(self) -> float:
        return float(np.max(self.per_seed))


@dataclass(frozen=True)
class Interval(_SeedSpread):
    """A statistic (not a difference: an AUROC), mean over seeds, with its bootstrap interval."""

    estimate: float
    """Mean over seeds of the statistic on all questions."""
    low: float
    high: float
    per_seed: tuple[float, ...]
    n_questions: int
    """Questions of the (OOD) set the statistic is about."""
    n_resamples: int
    level: float = LEVEL


@dataclass(frozen=True)
class Difference(_SeedSpread):
    """A − B of one metric, with its paired-bootstrap interval over questions and its seeds."""

    estimate: float
    """Mean over seeds of A − B on all questions."""
    low: float
    """Lower end of the percentile interval (NaN when a resample's difference is undefined,
    e.g. an infinite NLL in both models)."""
    high: float
    """Upper end of the percentile interval."""
    per_seed: tuple[float, ...]
    """A − B on all questions, one value per seed (the seed spread)."""
    a: float
    """A's metric on all questions, mean over seeds."""
    b: float
    """B's metric on all questions, mean over seeds."""
    n_questions: int
    n_resamples: int
    level: float = LEVEL

    @property
    def shown(self) -> bool:
        """The interval excludes 0 (False when it is undefined)."""
        return bool(self.low > 0 or self.high < 0)


# ----------------------------------------------------------------------------- resampling


def _resample_counts(n: int, n_resamples: int, seed: int) -> FloatArray:
    """(R, N): how often resample r draws question i (the draws of the module docstring)."""
    return _counts(np.random.default_rng(seed).integers(0, n, size=(n_resamples, n)), n)


def _counts(idx: NDArray[np.int64], n: int) -> FloatArray:
    """(R, N) counts of the (R, N) drawn indices ``idx``."""
    n_resamples = len(idx)
    # Row r's indices shifted into their own block of N, so one bincount counts every row.
    flat = (idx + n * np.arange(n_resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64)


def _question_terms(stack: FloatArray, y: NDArray[np.int64], metric: str) -> FloatArray:
    """(J, N) per-question terms whose mean over questions is the metric of each array."""
    rows = np.arange(stack.shape[1])
    if metric == "accuracy":
        return (np.argmax(stack, axis=2) == y).astype(np.float64)
    if metric == "nll":
        return -stack[:, rows, y]
    onehot = np.zeros(stack.shape[1:])
    onehot[rows, y] = 1.0
    return np.sum((np.exp(stack) - onehot) ** 2, axis=2)  # brier


def _resampled_scores(stack: FloatArray, y: NDArray[np.int64], metric: str, counts: FloatArray):
    """(R,): the metric of every resample, averaged over the stack's J arrays."""
    n = stack.shape[1]
    if metric == "ece":
        conf = np.exp(np.max(stack, axis=2))  # (J, N)
        gap = (np.argmax(stack, axis=2) == y) - conf
        # gap_by_bin[j, i, b]: question i's (correct − confidence) in its bin b, 0 elsewhere;
        # a resample's bin sums are then a matrix product with its counts.
        gap_by_bin = np.zeros((*conf.shape, ECE_BINS))
        j, i = np.indices(conf.shape)
        gap_by_bin[j, i, confidence_bin(conf, ECE_BINS)] = gap
        sums = counts @ gap_by_bin.transpose(1, 0, 2).reshape(n, -1)  # (R, J * B)
        per_array = np.abs(sums).reshape(len(counts), *gap_by_bin.shape[::2]).sum(axis=2) / n
        return per_array.mean(axis=1)
    if metric == "wrong_confidence":  # a ratio: Σ conf · wrong / Σ wrong over the draw
        conf = np.exp(np.max(stack, axis=2))
        wrong = (np.argmax(stack, axis=2) != y).astype(np.float64)  # (J, N)
        with np.errstate(invalid="ignore", divide="ignore"):  # no wrong answer drawn: NaN
            return (counts @ (wrong * conf).T / (counts @ wrong.T)).mean(axis=1)
    terms = _question_terms(stack, y, metric).mean(axis=0)  # linear: average the J arrays first
    # An infinite term (NLL of a true option with p = 0) makes every resample that draws it
    # infinite; 0 · inf would be NaN in the product, so those questions are counted apart.
    finite = np.isfinite(terms)
    scores = counts @ np.where(finite, terms, 0.0) / n
    drawn_infinite = counts @ (~finite).astype(np.float64) > 0
    return np.where(drawn_infinite, np.inf, scores)


def _percentile(values: FloatArray, q: float) -> float:
    """np.percentile's default (linear interpolation between order statistics), except that
    infinite neighbours give an infinite result rather than NaN (inf − inf); NaN if any value
    is NaN."""
    if np.isnan(values).any():
        return math.nan
    s = np.sort(values)
    position = (len(s) - 1) * q
    below = int(math.floor(position))
    above = min(below + 1, len(s) - 1)
    frac = position - below
    lo, hi = float(s[below]), float(s[above])
    if frac == 0 or lo == hi:
        return lo
    if math.isinf(lo) or math.isinf(hi):  # the infinite neighbour dominates
        return lo if math.isinf(lo) else hi
    return lo + frac * (hi - lo)


# ----------------------------------------------------------------------------- differences


def _as_stack(log_probs: ArrayLike) -> FloatArray:
    """A model's arrays as (J, N, K): an (N, K) array is a stack of one."""
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim == 2:
        lp = lp[None]
    if lp.ndim != 3 or 0 in lp.shape:
        raise ValueError(f"a model's log-probs must be (N, K) or (J, N, K), got {lp.shape}")
    if np.isnan(lp).any():
        raise ValueError("log-probs contain NaN")
    return lp


def _score(stack: FloatArray, y: NDArray[np.int64], metric: str) -> float:
    return float(np.mean([METRIC_FUNCTIONS[metric](x, y) for x in stack]))


def _check_seeds(a: Sequence, b: Sequence, n_resamples: int, level: float) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b need the same number (>= 1) of seeds, got {len(a)}, {len(b)}")
    if n_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < level < 1, got {n_resamples}, {level}")


def paired_difference(
    a: Sequence[ArrayLike],
    b: Sequence[ArrayLike],
    labels: ArrayLike,
    metric: str,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Difference:
    """A − B of ``metric`` over seeds, with its paired-bootstrap interval over questions.

    ``a`` and ``b`` hold one entry per seed (the same seeds, in the same order): a model's
    (N, K) log-probs, or a (J, N, K) stack whose metric is averaged over its J arrays (the mean
    single member, few-shot draws). Every entry scores the same N questions, whose true options
    are ``labels`` (N,); A and B may pad to different K. ``metric`` is a key of
    :data:`METRIC_FUNCTIONS`.
    """
    if metric not in METRIC_FUNCTIONS:
        raise ValueError(f"metric must be one of {sorted(METRIC_FUNCTIONS)}, got {metric!r}")
    _check_seeds(a, b, n_resamples, level)
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    stacks = [(_as_stack(x), _as_stack(z)) for x, z in zip(a, b, strict=True)]
    for x, z in stacks:
        if x.shape[1] != len(y) or z.shape[1] != len(y):
            raise ValueError(
                f"every seed must score the {len(y)} labelled questions, got {x.shape}, {z.shape}"
            )
    n = len(y)
    a_values = [_score(x, y, metric) for x, _ in stacks]
    b_values = [_score(z, y, metric) for _, z in stacks]

    counts = _resample_counts(n, n_resamples, seed)
    with np.errstate(invalid="ignore"):  # inf − inf = NaN: that resample's difference is undefined
        resampled = np.mean(
            [
                _resampled_scores(x, y, metric, counts) - _resampled_scores(z, y, metric, counts)
                for x, z in stacks
            ],
            axis=0,
        )
    return _difference(a_values, b_values, resampled, n, level)


def _difference(
    a_values: Sequence[float],
    b_values: Sequence[float],
    resampled: FloatArray,
    n: int,
    level: float,
) -> Difference:
    """The Difference from each seed's A and B on all questions and the resampled statistics."""
    per_seed = tuple(float(u - v) for u, v in zip(a_values, b_values, strict=True))
    tail = (1 - level) / 2
    return Difference(
        estimate=float(np.mean(per_seed)),
        low=_percentile(resampled, tail),
        high=_percentile(resampled, 1 - tail),
        per_seed=per_seed,
        a=float(np.mean(a_values)),
        b=float(np.mean(b_values)),
        n_questions=n,
        n_resamples=len(resampled),
        level=level,
    )


def diversity_difference(
    a_members: Sequence[ArrayLike],
    b_members: Sequence[ArrayLike],
    measure: str,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Difference:
    """A − B of how much a model's members differ, over seeds, with the same paired bootstrap
    over questions (and the same draws) as :func:`paired_difference`.

    ``a_members`` and ``b_members`` hold one (M, N, K) stack per seed (members, MC dropout
    passes; A and B may differ in M and K) scoring the same N questions. ``measure`` is a key
    of :data:`DIVERSITY_FUNCTIONS`; a stack's value is the mean over questions of its
    per-question measure, which needs no labels.
    """
    if measure not in DIVERSITY_FUNCTIONS:
        raise ValueError(f"measure must be one of {sorted(DIVERSITY_FUNCTIONS)}, got {measure!r}")
    _check_seeds(a_members, b_members, n_resamples, level)
    f = DIVERSITY_FUNCTIONS[measure]
    terms = [(f(x), f(z)) for x, z in zip(a_members, b_members, strict=True)]
    n = len(terms[0][0])
    if any(len(x) != n or len(z) != n for x, z in terms):
        raise ValueError("every seed's A and B must score the same number of questions")
    counts = _resample_counts(n, n_resamples, seed)
    resampled = np.mean([counts @ (x - z) / n for x, z in terms], axis=0)
    return _difference(
        [float(np.mean(x)) for x, _ in terms],
        [float(np.mean(z)) for _, z in terms],
        resampled,
        n,
        level,
    )


def ensemble_minus_single(
    member_log_probs: Sequence[ArrayLike],
    labels: ArrayLike,
    metric: str,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Difference:
    """The ensemble's ``metric`` minus its members' mean, from each seed's (M, N, K) member
    log-probs (the ensemble averages the members' probabilities, Eq. 2)."""
    members = [np.asarray(lp, dtype=np.float64) for lp in member_log_probs]
    return paired_difference(
        [ensemble_log_probs(lp) for lp in members],
        members,
        labels,
        metric,
        n_resamples=n_resamples,
        seed=seed,
        level=level,
    )


# ----------------------------------------------------------------------------- OOD detection


def _pair_counts(n_in: int, n_out: int, n_resamples: int, seed: int):
    """(R, N_in) and (R, N_out) counts of both sets' draws (the module docstring's)."""
    rng = np.random.default_rng(seed)
    idx_in = rng.integers(0, n_in, size=(n_resamples, n_in))
    idx_out = rng.integers(0, n_out, size=(n_resamples, n_out))
    return _counts(idx_in, n_in), _counts(idx_out, n_out)


def _resampled_auroc(
    s_in: FloatArray, s_out: FloatArray, c_in: FloatArray, c_out: FloatArray
) -> FloatArray:
    """(R,): the Mann–Whitney AUROC of every resample, from the drawn counts: Σ over drawn
    pairs of [s_out > s_in] + ½ [s_out = s_in], over N_in · N_out."""
    order = np.argsort(s_in, kind="stable")
    ranked = s_in[order]
    # cum[r, j]: in-distribution questions drawn by resample r among the j lowest scores.
    cum = np.concatenate([np.zeros((len(c_in), 1)), np.cumsum(c_in[:, order], axis=1)], axis=1)
    below = np.searchsorted(ranked, s_out, side="left")
    upto = np.searchsorted(ranked, s_out, side="right")
    wins = cum[:, below] + 0.5 * (cum[:, upto] - cum[:, below])  # (R, N_out)
    return np.sum(wins * c_out, axis=1) / (s_in.size * s_out.size)


def _score_stacks(pair: tuple[ArrayLike, ArrayLike]) -> tuple[FloatArray, FloatArray]:
    """One seed's (in, OOD) scores as (J, N_in) and (J, N_out) stacks."""
    s_in, s_out = (np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in pair)
    if s_in.ndim != 2 or s_out.ndim != 2 or len(s_in) != len(s_out) or 0 in s_in.shape:
        raise ValueError(
            f"scores must be (N,) or (J, N) with the same J, got {s_in.shape}, {s_out.shape}"
        )
    if s_out.shape[1] == 0 or np.isnan(s_in).any() or np.isnan(s_out).any():
        raise ValueError("OOD detection needs OOD questions and scores without NaN")
    return s_in, s_out


def _auroc_statistics(
    scores: Sequence[tuple[ArrayLike, ArrayLike]], n_resamples: int, seed: int
) -> tuple[list[float], FloatArray, int]:
    """Each seed's AUROC on all questions (mean over its J stacked scores), the mean over
    seeds of every resample's, and N_out."""
    stacks = [_score_stacks(pair) for pair in scores]
    n_in, n_out = stacks[0][0].shape[1], stacks[0][1].shape[1]
    if any(x.shape[1] != n_in or z.shape[1] != n_out for x, z in stacks):
        raise ValueError("every seed must score the same in-distribution and OOD questions")
    c_in, c_out = _pair_counts(n_in, n_out, n_resamples, seed)
    values = [
        float(np.mean([metrics.auroc(a, b) for a, b in zip(x, z, strict=True)])) for x, z in stacks
    ]
    resampled = np.mean(
        [
            np.mean(
                [_resampled_auroc(a, b, c_in, c_out) for a, b in zip(x, z, strict=True)], axis=0
            )
            for x, z in stacks
        ],
        axis=0,
    )
    return values, resampled, n_out


def auroc_interval(
    scores: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """AUROC of telling OOD questions (positive) from in-distribution ones by a score (higher:
    more OOD), mean over seeds, with the bootstrap interval that resamples both sets' questions.

    ``scores`` holds one (in, OOD) pair per seed: (N_in,) and (N_out,) scores, or (J, N_in) and
    (J, N_out) stacks whose AUROC is averaged over J (each single member's own score). Every
    seed scores the same questions, so one draw serves them all.
    """
    _check_seeds(scores, scores, n_resamples, level)
    values, resampled, n_out = _auroc_statistics(scores, n_resamples, seed)
    tail = (1 - level) / 2
    return Interval(
        estimate=float(np.mean(values)),
        low=_percentile(resampled, tail),
        high=_percentile(resampled, 1 - tail),
        per_seed=tuple(values),
        n_questions=n_out,
        n_resamples=n_resamples,
        level=level,
    )


def auroc_difference(
    a: Sequence[tuple[ArrayLike, ArrayLike]],
    b: Sequence[tuple[ArrayLike, ArrayLike]],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Difference:
    """A − B of the OOD-detection AUROC (see :func:`auroc_interval`) over seeds, both scored
    on the same questions and resampled with the same draws. ``n_questions`` is N_out."""
    _check_seeds(a, b, n_resamples, level)
    a_values, a_resampled, n_out = _auroc_statistics(a, n_resamples, seed)
    b_values, b_resampled, b_out = _auroc_statistics(b, n_resamples, seed)
    if b_out != n_out:
        raise ValueError(f"A and B score different OOD sets: {n_out} vs {b_out} questions")
    return _difference(a_values, b_values, a_resampled - b_resampled, n_out, level)
