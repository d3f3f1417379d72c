"""The metrics against independent implementations: scikit-learn and torchmetrics, on random
padded distributions (property tests), plus the exact-edge conventions of the ECE bins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score
from torchmetrics.functional.classification import multiclass_calibration_error

from loraens.evaluation.metrics import (
    accuracy,
    auroc,
    brier,
    ece,
    nll,
    normalize_label_log_probs,
    reliability_bins,
)

SETTINGS = settings(max_examples=60, deadline=None)
K_MAX = 5
N_BINS = 15
# Logits within ±10 keep every probability above sklearn's log_loss clipping (float64 eps).
logit = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False)


@st.composite
def padded_questions(draw):
    """(log_probs (N, K_MAX) with -inf padding, labels (N,)), 2..K_MAX options per question."""
    n = draw(st.integers(1, 30))
    n_choices = np.array(draw(st.lists(st.integers(2, K_MAX), min_size=n, max_size=n)))
    labels = np.array([draw(st.integers(0, int(k) - 1)) for k in n_choices])
    flat = draw(st.lists(logit, min_size=n * K_MAX, max_size=n * K_MAX))
    return normalize_label_log_probs(np.array(flat).reshape(n, K_MAX), n_choices), labels


@given(padded_questions())
@SETTINGS
def test_nll_equals_sklearn_log_loss(case):
    lp, labels = case
    expected = log_loss(labels, np.exp(lp), labels=list(range(K_MAX)))
    assert nll(lp, labels) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(padded_questions())
@SETTINGS
def test_brier_equals_sklearn_multiclass_brier_without_halving(case):
    # The multiclass Brier score: mean over questions of the sum over options of squared
    # errors, in [0, 2]; sklearn halves it only when asked (or for binary problems).
    lp, labels = case
    expected = brier_score_loss(labels, np.exp(lp), labels=list(range(K_MAX)), scale_by_half=False)
    assert brier(lp, labels) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def _away_from_edges(confidence: np.ndarray) -> bool:
    """No confidence within float32 rounding of a bin edge k/15 (or of 1.0)."""
    edges = np.arange(N_BINS + 1) / N_BINS
    return bool(np.min(np.abs(confidence[:, None] - edges[None, :])) > 1e-6)


@given(padded_questions())
@SETTINGS
def test_ece_equals_torchmetrics_l1_15_bins_away_from_edges(case):
    lp, labels = case
    probs = np.exp(lp)
    top = np.sort(probs, axis=1)
    assume(np.all(top[:, -1] - top[:, -2] > 1e-9))  # no tie for the predicted option
    assume(_away_from_edges(top[:, -1]))
    expected = multiclass_calibration_error(
        torch.from_numpy(probs),
        torch.from_numpy(labels),
        num_classes=K_MAX,
        n_bins=N_BINS,
        norm="l1",
    ).item()
    assert ece(lp, labels) == pytest.approx(expected, abs=1e-6)
    # accuracy against a plain count, as a by-product of the same draw
    assert accuracy(lp, labels) == pytest.approx(np.mean(probs.argmax(axis=1) == labels))


scores = st.lists(st.integers(-5, 5).map(float) | st.floats(-3, 3), min_size=1, max_size=40)


@given(scores, scores)
@SETTINGS
def test_auroc_equals_sklearn_roc_auc_with_ties(scores_in, scores_out):
    expected = roc_auc_score(
        np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))], np.r_[scores_in, scores_out]
    )
    assert auroc(scores_in, scores_out) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_exact_edges_fall_in_the_bin_above_and_one_in_the_last_bin():
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    # max p of a two-option question is >= 1/2: edges 8/15 .. 1 and a value just below 9/15.
    top = np.array([edges[8], np.nextafter(edges[9], 0.0), edges[12], edges[14], 1.0])
    probs = np.stack([top, 1.0 - top], axis=1)
    with np.errstate(divide="ignore"):
        lp = np.log(probs)
    assert np.array_equal(np.exp(lp.max(axis=1)), top)  # the edges survive log and exp
    bins = reliability_bins(lp, np.zeros(len(top), dtype=int))
    assert bins.count.tolist() == [0] * 8 + [2, 0, 0, 0, 1, 0, 2]
