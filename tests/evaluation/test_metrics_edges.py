"""Metric edge cases: input checks at their boundaries, non-default bin counts, float64 and
numerical stability, each against a value worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import log

from loraens.evaluation.metrics import (
    accuracy,
    auroc,
    ece,
    ensemble_log_probs,
    max_prob,
    mutual_information,
    nll,
    normalize_label_log_probs,
    predictive_entropy,
    reliability_bins,
    summarize,
)

# The four-question example of test_metrics.py (worked values there): confidences 0.70, 0.65,
# 0.45, 0.68; argmax 0, 1, 3, 1; with these labels q0 and q2 are right, q1 and q3 wrong.
LOG_PROBS = log(
    [
        [0.70, 0.20, 0.10, 0.0],
        [0.35, 0.65, 0.0, 0.0],
        [0.10, 0.20, 0.25, 0.45],
        [0.16, 0.68, 0.16, 0.0],
    ]
)
LABELS = np.array([0, 0, 3, 2])

# --------------------------------------------------------------------------- point metrics


def test_accuracy_three_of_four():
    # The four-question example with q1's label moved to its argmax (option 1): q0, q1, q2 are
    # right, q3 (argmax 1, label 2) is wrong -> 3/4. Unlike 2/4 this is not symmetric under
    # counting the wrong answers instead.
    labels = np.array([0, 1, 3, 2])
    assert accuracy(LOG_PROBS, labels) == 0.75
    assert summarize(LOG_PROBS, labels)["accuracy"] == 0.75


def test_single_option_questions_are_allowed():
    # K = 1: p = 1 on the only option, always right, NLL 0, entropy 0.
    lp = np.zeros((2, 1))
    assert accuracy(lp, np.array([0, 0])) == 1.0
    assert nll(lp, np.array([0, 0])) == 0.0
    np.testing.assert_array_equal(predictive_entropy(lp), [0.0, 0.0])


@pytest.mark.parametrize(
    ("bad", "shape"),
    [(np.zeros((0, 3)), r"\(0, 3\)"), (np.zeros((3, 0)), r"\(3, 0\)"), ([0.0, -1.0], r"\(2,\)")],
    ids=["no-questions", "no-options", "1-D"],
)
def test_log_probs_of_the_wrong_shape_are_rejected(bad, shape):
    with pytest.raises(ValueError, match=r"^log_probs must have shape \(N, K\).*got " + shape):
        predictive_entropy(bad)


def test_log_probs_with_nan_are_rejected():
    with pytest.raises(ValueError, match="^log_probs contains NaN"):
        nll([[math.nan, 0.0]], np.array([1]))


def test_label_shape_message_names_the_number_of_questions():
    # N = 2 questions with K = 3 options: the expected shape is (N,) = (2,), not (K,).
    lp = log([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    with pytest.raises(ValueError, match=r"^labels must have shape \(2,\), got \(3,\)"):
        accuracy(lp, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"^labels must have shape \(2,\), got \(1, 2\)"):
        accuracy(lp, np.array([[0, 1]]))


# --------------------------------------------------------------------------- float64 promise


def test_float32_log_probs_are_computed_in_float64():
    # Entropy of float32 inputs must match a float64 computation on the same (exactly
    # representable) values to float64 precision; float32 arithmetic is off by ~1e-7.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=50)
    lp32 = np.log(p).astype(np.float32)
    x = lp32.astype(np.float64)
    expected = -np.sum(np.exp(x) * x, axis=1)
    out = predictive_entropy(lp32)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=1e-13)
    conf = max_prob(lp32)
    assert conf.dtype == np.float64
    np.testing.assert_allclose(conf, np.exp(x.max(axis=1)), rtol=1e-15)


def test_float32_member_log_probs_are_computed_in_float64():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(5), size=(3, 40))
    lp32 = np.log(p).astype(np.float32)
    x = lp32.astype(np.float64)
    expected = np.log(np.mean(np.exp(x), axis=0))  # no over/underflow at these magnitudes
    out = ensemble_log_probs(lp32)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=1e-13)
    # Identical float32 members: the mutual information is zero to float64 rounding.
    same = np.stack([lp32[0]] * 3)
    np.testing.assert_allclose(mutual_information(same), 0.0, atol=1e-13)


# --------------------------------------------------------------------------- ensembles


def test_member_log_probs_of_the_wrong_shape_are_rejected():
    with pytest.raises(ValueError, match=r"^member_log_probs must have shape \(M, N, K\)"):
        ensemble_log_probs(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"^member_log_probs must have shape .*got \(2, 0, 3\)"):
        ensemble_log_probs(np.zeros((2, 0, 3)))
    with pytest.raises(ValueError, match="^member_log_probs contains NaN"):
        mutual_information([[[0.0, math.nan]]])


def test_ensemble_of_tiny_probabilities_does_not_underflow():
    # Option 1 has p = e^-1000 in member 0 and e^-1001 in member 1: exp() of either is 0 in
    # float64, so the mean must be taken after shifting by the per-entry maximum:
    #   log((e^-1000 + e^-1001) / 2) = -1000 + log(1 + e^-1) - log 2.
    members = np.array([[[0.0, -1000.0]], [[0.0, -1001.0]]])
    out = ensemble_log_probs(members)
    assert out[0, 0] == pytest.approx(0.0, abs=1e-300)
    assert out[0, 1] == pytest.approx(-1000.0 + math.log1p(math.exp(-1.0)) - math.log(2.0))


# ------------------------------------------------------------------ normalize_label_log_probs


def test_normalize_is_stable_for_huge_logits():
    # Two letters one nat apart, at logits around 0, -1000 and +1000: all three give
    # p_T = [1, e^-1] / (1 + e^-1), worked out in float64 after shifting by the row maximum.
    out = normalize_label_log_probs(
        [[0.0, -1.0], [-1000.0, -1001.0], [1000.0, 999.0]], np.array([2, 2, 2])
    )
    log_z = math.log1p(math.exp(-1.0))  # log(1 + e^-1), the normalizer after the shift
    expected = np.array([[-log_z, -1.0 - log_z]] * 3)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    np.testing.assert_allclose(np.exp(out[:, 0]), [0.7310585786300049] * 3, rtol=1e-12)


@pytest.mark.parametrize(
    ("bad", "shape"),
    [(np.zeros((0, 3)), r"\(0, 3\)"), (np.zeros((3, 0)), r"\(3, 0\)"), ([0.0, 1.0], r"\(2,\)")],
    ids=["no-questions", "no-options", "1-D"],
)
def test_normalize_rejects_label_logits_of_the_wrong_shape(bad, shape):
    with pytest.raises(ValueError, match=r"^label_logits must have shape \(N, K\).*got " + shape):
        normalize_label_log_probs(bad, np.array([1, 1]))


def test_normalize_allows_one_option():
    # K = 1 (one column) and n_choices = 1 (one real option among three columns): p = [1, 0...].
    np.testing.assert_array_equal(normalize_label_log_probs([[5.0]], np.array([1])), [[0.0]])
    out = normalize_label_log_probs([[0.3, 7.0, -2.0], [0.0, 1.0, 2.0]], np.array([1, 3]))
    np.testing.assert_array_equal(out[0], [0.0, -np.inf, -np.inf])
    np.testing.assert_allclose(np.exp(out[1]), np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum())


def test_normalize_rejects_n_choices_that_are_not_integers_of_shape_n():
    # N = 2 questions, K = 3 columns: the message names (N,) = (2,).
    logits = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"^n_choices must be an integer array of shape \(2,\)"):
        normalize_label_log_probs(logits, np.array([2.0, 3.0]))
    with pytest.raises(ValueError, match=r"^n_choices must be an integer array of shape \(2,\)"):
        normalize_label_log_probs(logits, np.array([2, 3, 3]))


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "+inf"])
def test_normalize_rejects_nan_or_inf_alone_in_a_real_option(bad):
    with pytest.raises(ValueError, match=r"^label_logits contains NaN or \+inf in a real option"):
        normalize_label_log_probs([[0.0, bad, 1.0]], np.array([2]))


def test_normalize_ignores_nan_and_inf_in_padding():
    out = normalize_label_log_probs([[0.0, 0.0, math.nan, math.inf]], np.array([2]))
    np.testing.assert_allclose(np.exp(out[0]), [0.5, 0.5, 0.0, 0.0])


# --------------------------------------------------------------------------- reliability bins / ECE


def test_ece_with_other_bin_counts_hand_values():
    # The four-question example (confidences 0.70, 0.65, 0.45, 0.68; correct y, n, y, n):
    # n_bins = 1: one bin, |acc - conf| = |2/4 - 2.48/4| = 0.12.
    # n_bins = 3 (edges 1/3, 2/3): bin 1 = {q1, q2}: 2/4 * |0.5 - 0.55| = 0.025;
    #   bin 2 = {q0, q3}: 2/4 * |0.5 - 0.69| = 0.095; ECE = 0.12.
    # (15 bins give 0.395, see test_metrics.py.)
    assert ece(LOG_PROBS, LABELS, n_bins=1) == pytest.approx(0.12, rel=1e-12)
    assert ece(LOG_PROBS, LABELS, n_bins=3) == pytest.approx(0.12, rel=1e-12)
    bins = reliability_bins(LOG_PROBS, LABELS, n_bins=3)
    np.testing.assert_array_equal(bins.count, [0, 2, 2])
    np.testing.assert_allclose(bins.confidence, [0.0, 0.55, 0.69], rtol=1e-12)


def test_one_bin_is_allowed():
    bins = reliability_bins(LOG_PROBS, LABELS, n_bins=1)
    assert bins.n_bins == 1
    np.testing.assert_array_equal(bins.count, [4])
    np.testing.assert_array_equal(bins.lower, [0.0])
    np.testing.assert_array_equal(bins.upper, [1.0])
    np.testing.assert_allclose(bins.confidence, [0.62], rtol=1e-12)
    np.testing.assert_allclose(bins.accuracy, [0.5])


def test_zero_bins_are_rejected():
    with pytest.raises(ValueError, match="^n_bins must be >= 1, got 0"):
        reliability_bins(LOG_PROBS, LABELS, n_bins=0)


def test_confidence_one_stays_in_the_last_of_n_bins():
    bins = reliability_bins(log([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), np.array([0, 0]))
    assert bins.n_bins == 15
    assert bins.count.shape == bins.confidence.shape == bins.accuracy.shape == (15,)
    assert bins.count[-1] == 2
    bins = reliability_bins(log([[1.0, 0.0]]), np.array([0]), n_bins=2)
    np.testing.assert_array_equal(bins.count, [0, 1])


def test_low_confidence_lands_in_bin_zero():
    # Three equal options: confidence 1/3 < 1/2, so with 2 bins it is in bin 0 ([0, 0.5)).
    bins = reliability_bins(log([[1 / 3, 1 / 3, 1 / 3]]), np.array([0]), n_bins=2)
    np.testing.assert_array_equal(bins.count, [1, 0])
    np.testing.assert_allclose(bins.confidence, [1 / 3, 0.0], rtol=1e-12)
    np.testing.assert_array_equal(bins.accuracy, [1.0, 0.0])


def test_bin_counts_are_integers():
    bins = reliability_bins(LOG_PROBS, LABELS)
    assert bins.count.dtype == np.int64


# --------------------------------------------------------------------------- AUROC


def test_auroc_with_one_score_on_either_side():
    assert auroc([0.1, 0.2], [0.3]) == 1.0
    assert auroc([0.1, 0.4], [0.3]) == 0.5
    assert auroc([0.3], [0.1, 0.2]) == 0.0


def test_auroc_rejects_nan_scores():
    with pytest.raises(ValueError, match="^scores contain NaN"):
        auroc([0.1, math.nan], [0.3])
    with pytest.raises(ValueError, match="^scores contain NaN"):
        auroc([0.1], [math.nan])
