"""Paired-bootstrap intervals, checked against a plain loop over the same draws (scored by the
point metrics) and against scipy.stats.bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import bootstrap, entropy

from loraens.evaluation.intervals import (
    METRIC_FUNCTIONS,
    auroc_difference,
    auroc_interval,
    diversity_difference,
    ensemble_minus_single,
    paired_difference,
)

METRICS = ("accuracy", "nll", "ece", "brier", "wrong_confidence")


def _log_probs(rng, shape, concentration=0.7, k_present=None):
    """Random log p_T of shape (..., N, K); rows i with k_present[i] < K padded with -inf."""
    p = rng.dirichlet(np.full(shape[-1], concentration), size=shape[:-1])
    if k_present is not None:
        pad = np.arange(shape[-1]) >= k_present[:, None]
        p = np.where(pad, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return np.log(p)


def _loop_resamples(a, b, labels, metric, n_resamples, seed):
    """Every resample's mean over seeds of A − B, one resample at a time with the point metric
    (a model's stack averaged), from the draws the module documents."""
    f = METRIC_FUNCTIONS[metric]
    n = len(labels)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))

    def score(model, rows):
        stack = model if model.ndim == 3 else model[None]
        return np.mean([f(x[rows], labels[rows]) for x in stack])

    out = []
    for rows in idx:
        with np.errstate(invalid="ignore"):
            out.append(
                np.mean([score(x, rows) - score(z, rows) for x, z in zip(a, b, strict=True)])
            )
    return np.asarray(out)


@pytest.fixture(scope="module")
def seeds_data():
    """Two seeds of a 3-member run on 60 questions, some with fewer than 4 options."""
    rng = np.random.default_rng(11)
    n = 60
    k_present = rng.integers(2, 5, size=n)
    labels = rng.integers(0, k_present)
    members = [_log_probs(rng, (3, n, 4), k_present=k_present) for _ in range(2)]
    return members, labels


@pytest.mark.parametrize("metric", METRICS)
def test_ensemble_minus_single_equals_a_loop_over_the_same_draws(seeds_data, metric):
    members, labels = seeds_data
    d = ensemble_minus_single(members, labels, metric, n_resamples=300, seed=5)
    # The ensemble written out independently: log of the members' mean probability.
    ensembles = [logsumexp(lp, axis=0) - math.log(lp.shape[0]) for lp in members]
    stats = _loop_resamples(ensembles, members, labels, metric, 300, 5)
    low, high = np.percentile(stats, [2.5, 97.5])
    assert d.low == pytest.approx(low, abs=1e-10)
    assert d.high == pytest.approx(high, abs=1e-10)

    f = METRIC_FUNCTIONS[metric]
    per_seed = [
        f(e, labels) - np.mean([f(x, labels) for x in lp])
        for e, lp in zip(ensembles, members, strict=True)
    ]
    assert d.per_seed == pytest.approx(per_seed, abs=1e-12)
    assert d.estimate == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert d.seed_sd == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2), abs=1e-12)
    assert (d.seed_min, d.seed_max) == pytest.approx(sorted(per_seed), abs=1e-12)
    assert (d.n_seeds, d.n_questions, d.n_resamples) == (2, 60, 300)


@pytest.mark.parametrize("metric", METRICS)
def test_a_stack_against_one_model_equals_the_loop(metric):
    """Few-shot draws (a stack whose metric is averaged) minus another model, padded to a
    different K, over two seeds."""
    rng = np.random.default_rng(2)
    n = 50
    labels = rng.integers(0, 3, size=n)
    draws = [_log_probs(rng, (4, n, 3)) for _ in range(2)]
    other = [_log_probs(rng, (n, 5), 0.3, k_present=np.full(n, 3)) for _ in range(2)]
    d = paired_difference(draws, other, labels, metric, n_resamples=200, seed=1)
    stats = _loop_resamples(draws, other, labels, metric, 200, 1)
    assert (d.low, d.high) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])), abs=1e-10)
    f = METRIC_FUNCTIONS[metric]
    assert d.a == pytest.approx(np.mean([np.mean([f(x, labels) for x in s]) for s in draws]))
    assert d.b == pytest.approx(np.mean([f(x, labels) for x in other]))


def test_seeds_share_one_draw_per_resample(seeds_data):
    """Pooling: each resample's statistic is the mean over seeds of the per-seed differences
    on the same questions, so the pooled interval is not any mix of per-seed intervals."""
    members, labels = seeds_data
    n, r = len(labels), 400
    idx = np.random.default_rng(9).integers(0, n, size=(r, n))
    per_seed = []
    for lp in members:
        ens = logsumexp(lp, axis=0) - math.log(lp.shape[0])
        nll_ens = -ens[np.arange(n), labels][idx].mean(axis=1)
        nll_single = np.mean([-x[np.arange(n), labels][idx].mean(axis=1) for x in lp], axis=0)
        per_seed.append(nll_ens - nll_single)
    pooled = np.mean(per_seed, axis=0)
    d = ensemble_minus_single(members, labels, "nll", n_resamples=r, seed=9)
    assert (d.low, d.high) == pytest.approx(tuple(np.percentile(pooled, [2.5, 97.5])), abs=1e-12)


@pytest.mark.parametrize("metric", ["nll", "ece"])
def test_agrees_with_scipy_bootstrap_percentile_interval(metric):
    rng = np.random.default_rng(4)
    n = 200
    labels = rng.integers(0, 4, size=n)
    a = _log_probs(rng, (n, 4), 0.5)
    b = _log_probs(rng, (n, 4), 1.5)
    f = METRIC_FUNCTIONS[metric]

    def statistic(rows):  # the paired difference on resampled question indices
        return f(a[rows], labels[rows]) - f(b[rows], labels[rows])

    ref = bootstrap(
        (np.arange(n),),
        statistic,
        n_resamples=4000,
        method="percentile",
        vectorized=False,
        paired=True,
        random_state=np.random.default_rng(0),
    ).confidence_interval
    d = paired_difference([a], [b], labels, metric, n_resamples=4000, seed=3)
    width = ref.high - ref.low
    # Different draws: the endpoints agree to within Monte Carlo error, a few % of the width.
    assert d.low == pytest.approx(ref.low, abs=0.1 * width)
    assert d.high == pytest.approx(ref.high, abs=0.1 * width)
    assert d.estimate == pytest.approx(statistic(np.arange(n)), abs=1e-12)


def test_a_clear_difference_is_shown_and_none_is_not():
    rng = np.random.default_rng(8)
    n = 300
    labels = rng.integers(0, 4, size=n)
    sharp = np.log(np.full((n, 4), 0.1))
    sharp[np.arange(n), labels] = np.log(0.7)  # right with p = 0.7 everywhere
    uniform = np.log(np.full((n, 4), 0.25))
    clear = paired_difference([sharp, sharp], [uniform, uniform], labels, "nll")
    assert clear.shown and clear.high < 0
    assert clear.estimate == pytest.approx(-math.log(0.7) + math.log(0.25))

    # Two models drawn alike: no difference to show.
    a, b = _log_probs(rng, (2, n, 4)), _log_probs(rng, (2, n, 4))
    for metric in METRICS:
        none = paired_difference(list(a), list(b), labels, metric)
        assert none.low < 0 < none.high and not none.shown, metric
    same = paired_difference([a[0]], [a[0]], labels, "ece")
    assert (same.low, same.high, same.shown) == (0.0, 0.0, False)
    assert math.isnan(same.seed_sd)  # one seed: no spread to tell


def test_the_same_seed_gives_the_same_interval(seeds_data):
    members, labels = seeds_data
    first = ensemble_minus_single(members, labels, "ece", n_resamples=100, seed=1)
    assert ensemble_minus_single(members, labels, "ece", n_resamples=100, seed=1) == first
    assert ensemble_minus_single(members, labels, "ece", n_resamples=100, seed=2) != first


def test_an_impossible_true_option_makes_the_resamples_drawing_it_infinite():
    rng = np.random.default_rng(6)
    n = 40
    labels = rng.integers(0, 3, size=n)
    a = _log_probs(rng, (n, 3))
    probs = np.full(3, 0.5)
    probs[labels[0]] = 0.0  # p = 0 on the true option: its NLL is infinite
    with np.errstate(divide="ignore"):
        a[0] = np.log(probs)
    b = _log_probs(rng, (n, 3))
    d = paired_difference([a], [b], labels, "nll", n_resamples=300, seed=0)
    stats = _loop_resamples([a], [b], labels, "nll", 300, 0)
    assert np.isinf(stats).mean() > 0.5  # most resamples draw question 0
    assert d.estimate == math.inf and d.high == math.inf
    assert d.low == pytest.approx(np.percentile(stats, 2.5), abs=1e-10)
    # Infinite in both models: the difference is undefined, and so is its interval.
    both = paired_difference([a], [a], labels, "nll", n_resamples=50)
    assert math.isnan(both.low) and math.isnan(both.high) and not both.shown


def _diversity_loop(members: np.ndarray, measure: str, rows: np.ndarray) -> float:
    """A member stack's mean diversity on the questions ``rows``, one question at a time, with
    scipy's entropy (padding is probability 0)."""
    values = []
    for i in rows:
        p = np.exp(members[:, i])  # (M, K)
        mean = p.mean(axis=0)
        if measure == "mutual_information":
            values.append(entropy(mean) - np.mean([entropy(q) for q in p]))
        else:  # disagreement: members whose top option is not the mean's
            values.append(np.mean(p.argmax(axis=1) != mean.argmax()))
    return float(np.mean(values))


@pytest.mark.parametrize("measure", ["mutual_information", "disagreement"])
def test_diversity_difference_equals_a_loop_over_the_same_draws(seeds_data, measure):
    """Members of two seeds (3 members, padded options) against 5 MC-dropout-like passes with
    another K: A and B are compared seed by seed on one draw per resample."""
    members, labels = seeds_data
    rng = np.random.default_rng(3)
    passes = [_log_probs(rng, (5, len(labels), 6), 3.0, k_present=np.full(len(labels), 4))]
    passes.append(_log_probs(rng, (5, len(labels), 6), 0.3, k_present=np.full(len(labels), 4)))
    d = diversity_difference(members, passes, measure, n_resamples=200, seed=4)
    n = len(labels)
    everything = np.arange(n)
    per_seed = [
        _diversity_loop(x, measure, everything) - _diversity_loop(z, measure, everything)
        for x, z in zip(members, passes, strict=True)
    ]
    assert d.per_seed == pytest.approx(per_seed, abs=1e-10)
    assert d.a == pytest.approx(np.mean([_diversity_loop(x, measure, everything) for x in members]))
    idx = np.random.default_rng(4).integers(0, n, size=(200, n))
    stats = [
        np.mean(
            [
                _diversity_loop(x, measure, rows) - _diversity_loop(z, measure, rows)
                for x, z in zip(members, passes, strict=True)
            ]
        )
        for rows in idx
    ]
    assert (d.low, d.high) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])), abs=1e-10)
    assert (d.n_seeds, d.n_questions, d.n_resamples) == (2, n, 200)


def test_members_alike_are_shown_less_diverse():
    rng = np.random.default_rng(12)
    n = 200
    base = _log_probs(rng, (n, 4))
    alike = np.stack([base] * 4)  # identical members: no diversity at all
    apart = _log_probs(rng, (4, n, 4), 0.3)  # sharp, independent members
    for measure in ("mutual_information", "disagreement"):
        d = diversity_difference([alike], [apart], measure)
        assert d.a == pytest.approx(0.0, abs=1e-12) and d.shown and d.high < 0, measure
        same = diversity_difference([apart], [apart], measure)
        assert (same.estimate, same.shown) == (0.0, False)


def test_inputs_are_checked(seeds_data):
    members, labels = seeds_data
    with pytest.raises(ValueError, match="metric"):
        ensemble_minus_single(members, labels, "auroc")
    with pytest.raises(ValueError, match="labelled questions"):
        ensemble_minus_single(members, labels[:-1], "nll")
    with pytest.raises(ValueError, match="same number"):
        paired_difference(members, members[:1], labels, "nll")
    with pytest.raises(ValueError, match="measure"):
        diversity_difference(members, members, "variance")
    with pytest.raises(ValueError, match="same number of questions"):
        diversity_difference(members, [m[:, :-1] for m in members], "disagreement")


# ----------------------------------------------------------------------------- OOD detection


def _sklearn_auroc(s_in, s_out):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])


@pytest.mark.parametrize("stacked", [False, True])
def test_auroc_interval_is_the_loop_over_draws_of_both_sets_with_ties(stacked):
    rng = np.random.default_rng(5)
    n_in, n_out, r = 23, 11, 150
    shape = (3,) if stacked else ()
    # Scores on a coarse grid: many ties, within and across the two sets.
    pairs = [
        (
            np.round(rng.normal(size=(*shape, n_in)), 1),
            np.round(rng.normal(0.4, size=(*shape, n_out)), 1),
        )
        for _ in range(2)
    ]
    got = auroc_interval(pairs, n_resamples=r, seed=9)
    draws = np.random.default_rng(9)
    idx_in, idx_out = draws.integers(0, n_in, (r, n_in)), draws.integers(0, n_out, (r, n_out))

    def statistic(i, o):
        return np.mean(
            [
                np.mean(
                    [
                        _sklearn_auroc(a[i], b[o])
                        for a, b in zip(np.atleast_2d(x), np.atleast_2d(z), strict=True)
                    ]
                )
                for x, z in pairs
            ]
        )

    everything = np.arange(n_in), np.arange(n_out)
    per_seed = [
        np.mean(
            [_sklearn_auroc(a, b) for a, b in zip(np.atleast_2d(x), np.atleast_2d(z), strict=True)]
        )
        for x, z in pairs
    ]
    low, high = np.percentile(
        [statistic(i, o) for i, o in zip(idx_in, idx_out, strict=True)], [2.5, 97.5]
    )
    assert got.estimate == pytest.approx(statistic(*everything), abs=1e-12)
    assert got.per_seed == pytest.approx(per_seed, abs=1e-12)
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
    assert (got.n_questions, got.n_resamples, got.n_seeds) == (n_out, r, 2)


def test_auroc_difference_uses_the_same_draws_for_a_and_b():
    rng = np.random.default_rng(6)
    a = [(rng.normal(size=15), rng.normal(1.0, size=12))]
    b = [(rng.normal(size=15), rng.normal(0.2, size=12))]
    d = auroc_difference(a, b, n_resamples=200, seed=2)
    ia, ib = auroc_interval(a, n_resamples=200, seed=2), auroc_interval(b, n_resamples=200, seed=2)
    assert d.estimate == pytest.approx(ia.estimate - ib.estimate, abs=1e-12)
    assert (d.a, d.b) == pytest.approx((ia.estimate, ib.estimate), abs=1e-12)
    # A − A is exactly 0 on every resample: the same draws.
    same = auroc_difference(a, a, n_resamples=200, seed=2)
    assert (same.low, same.high, same.estimate) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same in-distribution and OOD questions"):
        auroc_interval([a[0], (a[0][0], a[0][1][:5])])
