"""Split conformal sets: coverage on exchangeable synthetic data, a worked example, and
agreement with MAPIE (an independent implementation) on the same probabilities."""

import math

import numpy as np
import pytest
from helpers import log

from loraens.decisions.conformal import (
    conformal_quantile,
    conformal_sets,
    option_scores,
    prediction_sets,
    true_option_scores,
)


def _exchangeable(rng, n, k=4):
    """Probabilities from a Dirichlet and labels drawn from them: a calibrated model, so every
    question (held-out or new) is drawn alike."""
    p = rng.dirichlet(np.full(k, 0.7), size=n)
    labels = (rng.uniform(size=(n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return np.log(p), np.minimum(labels, k - 1)


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_coverage_is_within_the_binomial_tolerance_of_the_target(score):
    rng = np.random.default_rng(0)
    draws, n_cal, n_test, target = 300, 100, 100, 0.9
    covered = 0
    for _ in range(draws):
        cal_lp, cal_y = _exchangeable(rng, n_cal)
        test_lp, test_y = _exchangeable(rng, n_test)
        covered += (
            conformal_sets(cal_lp, cal_y, test_lp, target, score).empirical_coverage(test_y)
            * n_test
        )
    rate = covered / (draws * n_test)
    # Conformal guarantees target <= E[coverage] <= target + 1/(n_cal + 1) (no ties). The
    # mean over draws scatters by a calibration part (Beta variance / draws) and a binomial
    # part; 4 standard deviations of both.
    sd = math.sqrt(target * (1 - target) / (n_cal + 2) / draws)
    sd += math.sqrt(target * (1 - target) / (draws * n_test))
    assert target - 4 * sd <= rate <= target + 1 / (n_cal + 1) + 4 * sd


def test_a_worked_example():
    p = np.array([[0.6, 0.3, 0.1], [0.5, 0.25, 0.25], [0.2, 0.7, 0.1]])
    lp = np.log(p)
    np.testing.assert_allclose(true_option_scores(lp, [0, 1, 1], "lac"), [0.4, 0.75, 0.3])
    # aps: mass of every option at least as likely as the answer (ties both count)
    np.testing.assert_allclose(true_option_scores(lp, [1, 1, 2], "aps"), [0.9, 1.0, 1.0])
    # n = 3, alpha = 0.5: the ceil(4 · 0.5) = 2nd smallest score
    assert conformal_quantile([0.4, 0.75, 0.3], 0.5) == 0.4
    assert conformal_quantile([0.4, 0.75, 0.3], 0.1) == math.inf  # rank 4 > n
    # LAC may leave a question whose best option is not sure enough with an empty set
    np.testing.assert_array_equal(
        prediction_sets(lp, 0.45, "lac"),
        [[True, False, False], [False, False, False], [False, True, False]],
    )
    # APS adds options in order of probability until the mass reaches q̂
    np.testing.assert_array_equal(
        prediction_sets(lp, 0.9, "aps"),
        [[True, True, False], [True, False, False], [True, True, False]],
    )


def test_padding_is_never_in_a_set():
    lp = log([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    for score in ("lac", "aps"):
        assert np.isposinf(option_scores(lp, score)[0, 2])
        assert not prediction_sets(lp, math.inf, score)[0, 2]
        assert prediction_sets(lp, math.inf, score)[1].all()


mapie = pytest.importorskip("mapie")


class _Fixed:
    """A 'prefit classifier' whose predict_proba returns given probabilities: X is the row."""

    _estimator_type = "classifier"

    def __init__(self, probs):
        self.probs = probs

    def fit(self, X, y):
        self.classes_ = np.arange(self.probs.shape[1])
        self.n_features_in_ = 1
        return self

    def predict_proba(self, X):
        return self.probs[np.asarray(X, dtype=int)[:, 0]]

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)

    def get_params(self, deep=True):
        return {"probs": self.probs}

    def set_params(self, **params):
        return self

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags())  # fmt: skip


def test_lac_sets_agree_with_mapie():
    from mapie.classification import SplitConformalClassifier

    rng = np.random.default_rng(1)
    cal_lp, cal_y = _exchangeable(rng, 300)
    test_lp, _ = _exchangeable(rng, 200)
    probs = np.exp(np.concatenate([cal_lp, test_lp]))
    ours = conformal_sets(cal_lp, cal_y, test_lp, 0.9, "lac")
    clf = _Fixed(probs).fit(None, None)
    theirs = SplitConformalClassifier(clf, confidence_level=0.9, conformity_score="lac")
    theirs.conformalize(np.arange(300)[:, None], cal_y)
    _, sets = theirs.predict_set(np.arange(300, 500)[:, None])
    np.testing.assert_array_equal(ours.sets, sets[:, :, 0])


def test_aps_scores_and_quantile_agree_with_mapie():
    from mapie.conformity_scores import APSConformityScore
    from mapie.utils import _compute_classification_quantile

    rng = np.random.default_rng(2)
    lp, y = _exchangeable(rng, 400)
    # MAPIE's non-randomised APS score: cumulative probability through the true label
    theirs, _ = APSConformityScore.get_true_label_cumsum_proba(y, np.exp(lp), np.arange(4))
    ours = true_option_scores(lp, y, "aps")
    np.testing.assert_allclose(ours, theirs[:, 0], atol=1e-12)
    for alpha in (0.05, 0.1, 0.2):
        q = _compute_classification_quantile(theirs, np.array([alpha]))
        assert conformal_quantile(ours, alpha) == pytest.approx(float(np.ravel(q)[0]))
