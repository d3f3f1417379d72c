"""Property-based checks of the metrics on random padded distributions."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from loraens.evaluation.metrics import (
    accuracy,
    brier,
    ece,
    ensemble_log_probs,
    mutual_information,
    nll,
    normalize_label_log_probs,
    summarize,
)

SETTINGS = settings(max_examples=100, deadline=None)
K_MAX = 5

logit = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False)


@st.composite
def padded_members(draw, max_members: int = 1):
    """(member_log_probs (M, N, K_MAX), labels (N,)) with 2..K_MAX options per question."""
    m = draw(st.integers(1, max_members))
    n = draw(st.integers(1, 12))
    n_choices = np.array(draw(st.lists(st.integers(2, K_MAX), min_size=n, max_size=n)))
    labels = np.array([draw(st.integers(0, int(k) - 1)) for k in n_choices])
    members = []
    for _ in range(m):
        flat = draw(st.lists(logit, min_size=n * K_MAX, max_size=n * K_MAX))
        logits = np.array(flat).reshape(n, K_MAX)
        members.append(normalize_label_log_probs(logits, n_choices))
    return np.stack(members), labels


@st.composite
def padded(draw):
    members, labels = draw(padded_members())
    return members[0], labels


@SETTINGS
@given(padded())
def test_metric_ranges(case):
    lp, y = case
    assert 0.0 <= accuracy(lp, y) <= 1.0
    assert 0.0 <= ece(lp, y) <= 1.0
    assert nll(lp, y) >= 0.0
    assert 0.0 <= brier(lp, y) <= 2.0 + 1e-12
    assert not any(np.isnan(v) for v in summarize(lp, y).values())


@SETTINGS
@given(padded(), st.randoms(use_true_random=False))
def test_metrics_invariant_to_question_order(case, rnd):
    lp, y = case
    perm = np.array(rnd.sample(range(len(y)), len(y)))
    before, after = summarize(lp, y), summarize(lp[perm], y[perm])
    assert before["accuracy"] == after["accuracy"]
    for key in ("nll", "ece", "brier"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(padded(), st.integers(1, 6))
def test_ensemble_of_identical_members_is_the_member(case, m):
    lp, _ = case
    out = ensemble_log_probs(np.stack([lp] * m))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(lp))
    finite = np.isfinite(lp)
    np.testing.assert_allclose(out[finite], lp[finite], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mutual_information(np.stack([lp] * m)), 0.0, atol=1e-9)


@SETTINGS
@given(padded_members(max_members=5), st.randoms(use_true_random=False))
def test_ensemble_invariant_to_member_order(case, rnd):
    members, _ = case
    perm = np.array(rnd.sample(range(len(members)), len(members)))
    a, b = ensemble_log_probs(members), ensemble_log_probs(members[perm])
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
    np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], rtol=1e-12, atol=1e-12)
    assert not np.isnan(a).any()


@SETTINGS
@given(padded_members(max_members=5))
def test_ensemble_nll_at_most_mean_member_nll(case):
    # Jensen: -log(mean_m p_m) <= mean_m(-log p_m) for every question, hence on average too.
    members, y = case
    ens = nll(ensemble_log_probs(members), y)
    mean_member = np.mean([nll(lp, y) for lp in members])
    assert ens <= mean_member + 1e-9
    assert (mutual_information(members) >= -1e-9).all()
