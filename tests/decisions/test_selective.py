"""Selective prediction, each figure against a brute-force computation written here."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from loraens.decisions.selective import (
    accuracy_at_coverage,
    aurc,
    choose_threshold,
    e_aurc,
    misclassification_auroc,
    risk_coverage,
    selective_summary,
)


def _data(n, seed, decimals=None):
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(size=n)
    if decimals is not None:
        confidence = confidence.round(decimals)  # many ties
    correct = rng.uniform(size=n) < confidence  # confident answers are more often right
    return confidence, correct


def _brute_curve(confidence, correct):
    """For every distinct threshold: answer everything at least that confident."""
    points = []
    for t in sorted(set(confidence.tolist()), reverse=True):
        answered = confidence >= t
        points.append((t, answered.mean(), 1 - correct[answered].mean()))
    return points


@pytest.mark.parametrize("decimals", [None, 1])
def test_risk_coverage_and_aurc_match_a_loop_over_thresholds(decimals):
    confidence, correct = _data(300, seed=1, decimals=decimals)
    points = _brute_curve(confidence, correct)
    curve = risk_coverage(confidence, correct)
    np.testing.assert_allclose(curve.thresholds, [p[0] for p in points])
    np.testing.assert_allclose(curve.coverage, [p[1] for p in points])
    np.testing.assert_allclose(curve.risk, [p[2] for p in points])
    area, previous = 0.0, 0.0
    for _, cov, risk in points:
        area += risk * (cov - previous)
        previous = cov
    assert aurc(confidence, correct) == pytest.approx(area)


def test_aurc_without_ties_is_the_mean_error_of_the_k_most_confident():
    confidence, correct = _data(200, seed=2)
    order = np.argsort(-confidence)
    topk = [1 - correct[order[:k]].mean() for k in range(1, 201)]
    assert aurc(confidence, correct) == pytest.approx(np.mean(topk))


def test_e_aurc_is_zero_for_the_ideal_ranking_and_aurc_minus_it_otherwise():
    confidence, correct = _data(150, seed=3)
    ideal_conf = correct.astype(float) + np.linspace(0, 0.5, 150)  # every right answer first
    assert e_aurc(ideal_conf, correct) == pytest.approx(0.0, abs=1e-12)
    ideal = aurc(ideal_conf, correct)
    assert e_aurc(confidence, correct) == pytest.approx(aurc(confidence, correct) - ideal)
    assert e_aurc(confidence, correct) > 0


def test_accuracy_at_coverage_matches_sorting():
    confidence, correct = _data(101, seed=4)
    order = np.argsort(-confidence)
    for cov in (0.5, 0.8, 0.9, 1.0):
        k = math.ceil(cov * 101)
        assert accuracy_at_coverage(confidence, correct, cov) == correct[order[:k]].mean()


def test_misclassification_auroc_agrees_with_sklearn():
    confidence, correct = _data(400, seed=5, decimals=2)
    uncertainty = -confidence
    expected = roc_auc_score(~correct, uncertainty)
    assert misclassification_auroc(uncertainty, correct) == pytest.approx(expected)
    assert math.isnan(misclassification_auroc(uncertainty, np.ones(400, dtype=bool)))


@pytest.mark.parametrize("max_risk", [0.0, 0.1, 0.25, 1.0])
def test_threshold_is_the_largest_coverage_within_the_risk(max_risk):
    confidence, correct = _data(250, seed=6, decimals=2)
    best = None
    for t, cov, risk in _brute_curve(confidence, correct):
        if risk <= max_risk and (best is None or cov > best[1]):
            best = (t, cov, risk)
    chosen = choose_threshold(confidence, correct, max_risk)
    if best is None:
        assert chosen.threshold == math.inf and chosen.coverage == 0
    else:
        assert (chosen.threshold, chosen.coverage) == pytest.approx(best[:2])
        assert chosen.risk <= max_risk


def test_summary_of_an_ensemble_has_every_figure():
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(4), size=(3, 80)))
    labels = rng.integers(0, 4, 80)
    summary = selective_summary(lp, labels)
    assert set(summary) == {
        "aurc", "e_aurc", "accuracy@50", "accuracy@80", "accuracy@90",
        "misclass_auroc_max_prob", "misclass_auroc_entropy", "misclass_auroc_mi",
    }  # fmt: skip
    assert 0 <= summary["e_aurc"] <= summary["aurc"] <= 1
