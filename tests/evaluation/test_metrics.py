"""Metrics pinned against values worked out by hand on tiny examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import log

from loraens.evaluation.metrics import (
    accuracy,
    auroc,
    brier,
    disagreement,
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

# Four questions with 3, 2, 4 and 3 options (K_max = 4; 0.0 below marks padding):
#
#   q  p_T                       label  argmax  correct  conf  bin (conf * 15)
#   0  [0.70, 0.20, 0.10, -]     0      0       yes      0.70  10 (10.50)
#   1  [0.35, 0.65, -,    -]     0      1       no       0.65   9 ( 9.75)
#   2  [0.10, 0.20, 0.25, 0.45]  3      3       yes      0.45   6 ( 6.75)
#   3  [0.16, 0.68, 0.16, -]     2      1       no       0.68  10 (10.20)
#
# accuracy = 2/4 = 0.5
# NLL      = (-ln 0.70 - ln 0.35 - ln 0.45 - ln 0.16) / 4
#          = (0.356675 + 1.049822 + 0.798508 + 1.832581) / 4 = 1.009397
# Brier    q0: 0.3² + 0.2² + 0.1²            = 0.09 + 0.04 + 0.01            = 0.14
#          q1: 0.65² + 0.65²                 = 0.4225 + 0.4225               = 0.845
#          q2: 0.1² + 0.2² + 0.25² + 0.55²   = 0.01 + 0.04 + 0.0625 + 0.3025 = 0.415
#          q3: 0.16² + 0.68² + 0.84²         = 0.0256 + 0.4624 + 0.7056      = 1.1936
#          mean = 2.5936 / 4 = 0.6484
# ECE      bin 6:  1 question, conf 0.45, acc 1   -> 1/4 * |1   - 0.45| = 0.1375
#          bin 9:  1 question, conf 0.65, acc 0   -> 1/4 * |0   - 0.65| = 0.1625
#          bin 10: 2 questions, conf (0.70 + 0.68)/2 = 0.69, acc 1/2
#                                                 -> 2/4 * |0.5 - 0.69| = 0.095
#          ECE = 0.1375 + 0.1625 + 0.095 = 0.395
PROBS = [
    [0.70, 0.20, 0.10, 0.0],
    [0.35, 0.65, 0.0, 0.0],
    [0.10, 0.20, 0.25, 0.45],
    [0.16, 0.68, 0.16, 0.0],
]
LABELS = np.array([0, 0, 3, 2])
N_CHOICES = np.array([3, 2, 4, 3])
LOG_PROBS = log(PROBS)


def test_accuracy_hand_value():
    assert accuracy(LOG_PROBS, LABELS) == 0.5


def test_nll_hand_value():
    expected = -(math.log(0.70) + math.log(0.35) + math.log(0.45) + math.log(0.16)) / 4
    assert nll(LOG_PROBS, LABELS) == pytest.approx(expected, rel=1e-12)
    assert nll(LOG_PROBS, LABELS) == pytest.approx(1.009397, abs=1e-6)


def test_brier_hand_value():
    assert brier(LOG_PROBS, LABELS) == pytest.approx(0.6484, rel=1e-12)


def test_ece_hand_value():
    assert ece(LOG_PROBS, LABELS) == pytest.approx(0.395, rel=1e-12)


def test_reliability_bins_hand_values():
    bins = reliability_bins(LOG_PROBS, LABELS)
    assert bins.n_bins == 15
    np.testing.assert_allclose(bins.lower, np.arange(15) / 15, atol=1e-15)
    np.testing.assert_allclose(bins.upper, np.arange(1, 16) / 15, atol=1e-15)
    expected_count = np.zeros(15, dtype=int)
    expected_count[[6, 9, 10]] = [1, 1, 2]
    np.testing.assert_array_equal(bins.count, expected_count)
    np.testing.assert_allclose(bins.confidence[[6, 9, 10]], [0.45, 0.65, 0.69], rtol=1e-12)
    np.testing.assert_allclose(bins.accuracy[[6, 9, 10]], [1.0, 0.0, 0.5])
    # Empty bins report 0, never NaN.
    empty = bins.count == 0
    assert not np.isnan(bins.confidence).any() and not np.isnan(bins.accuracy).any()
    assert (bins.confidence[empty] == 0).all() and (bins.accuracy[empty] == 0).all()


def test_summarize_returns_python_floats():
    out = summarize(LOG_PROBS, LABELS)
    assert set(out) == {"accuracy", "nll", "ece", "brier"}
    assert all(type(v) is float for v in out.values())
    assert out["accuracy"] == 0.5
    assert out["nll"] == pytest.approx(1.009397, abs=1e-6)
    assert out["ece"] == pytest.approx(0.395)
    assert out["brier"] == pytest.approx(0.6484)


def test_normalize_uses_only_the_questions_own_letters():
    # Logits = log p + an arbitrary per-question shift (the full-vocabulary normalizer), and
    # junk in the padded columns, which must be ignored (even a huge logit there).
    shift = np.array([[3.0], [-7.0], [0.5], [12.0]])
    logits = np.where(np.array(PROBS) > 0, log(PROBS) + shift, 0.0)
    logits[0, 3] = 1e6
    logits[1, 2:] = [50.0, -np.inf]
    out = normalize_label_log_probs(logits.astype(np.float32), N_CHOICES)
    assert out.dtype == np.float64
    pad = np.arange(4)[None, :] >= N_CHOICES[:, None]
    assert np.isneginf(out[pad]).all()
    np.testing.assert_allclose(np.exp(out), PROBS, atol=1e-6)
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, rtol=1e-12)


def test_normalize_hand_value():
    # Two letters with logits 0 and ln 3: p_T = [1/4, 3/4], whatever the third column holds.
    out = normalize_label_log_probs([[0.0, math.log(3.0), 9.0]], np.array([2]))
    np.testing.assert_allclose(np.exp(out[0, :2]), [0.25, 0.75], rtol=1e-12)
    assert out[0, 2] == -np.inf


def test_normalize_rejects_bad_option_counts():
    with pytest.raises(ValueError, match=r"^n_choices must lie in \[1, 3\]"):
        normalize_label_log_probs(np.zeros((2, 3)), np.array([2, 4]))
    with pytest.raises(ValueError, match=r"^n_choices must lie in \[1, 3\]"):
        normalize_label_log_probs(np.zeros((2, 3)), np.array([0, 2]))


def test_ece_perfectly_calibrated_is_zero():
    # Four two-option questions, all at confidence 0.75 (one bin), three of four correct:
    # bin accuracy 0.75 == bin confidence 0.75, so ECE = 0.
    lp = log([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert ece(lp, labels) == pytest.approx(0.0, abs=1e-12)


def test_confidence_one_falls_in_last_bin():
    # Probabilities [1, 0, 0]: confidence exactly 1.0, correct -> last bin, ECE = |1 - 1| = 0.
    lp = log([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    bins = reliability_bins(lp, np.array([0, 0]))
    assert bins.count[-1] == 2 and bins.count[:-1].sum() == 0
    assert bins.confidence[-1] == 1.0 and bins.accuracy[-1] == 0.5
    assert ece(lp, np.array([0, 1])) == 0.0


def test_bins_are_half_open_on_the_left():
    # With 4 bins the edges 0, 0.25, 0.5, 0.75, 1 are exact; confidence 0.5 belongs to [0.5, 0.75).
    bins = reliability_bins(log([[0.5, 0.5]]), np.array([0]), n_bins=4)
    np.testing.assert_array_equal(bins.count, [0, 0, 1, 0])


def test_nll_of_zero_probability_label_is_inf_not_nan():
    assert nll(log([[1.0, 0.0]]), np.array([1])) == math.inf


def test_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 4\)"):
        accuracy(LOG_PROBS, np.array([0, 0, 4, 0]))
    with pytest.raises(ValueError, match=r"^labels must lie in \[0, 4\)"):
        accuracy(LOG_PROBS, np.array([0, -1, 0, 0]))
    with pytest.raises(ValueError, match=r"^labels must have shape \(4,\), got \(3,\)"):
        nll(LOG_PROBS, np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="^labels must be integers, got dtype float64"):
        brier(LOG_PROBS, np.array([0.0, 0.0, 1.0, 0.0]))


# --------------------------------------------------------------------------- ensembles


def test_ensemble_averages_probabilities_not_logits():
    # Member 1: [0.9, 0.1], member 2: [0.5, 0.5].
    # Mean of probabilities: [0.7, 0.3].
    # Softmax of mean log-probs: ∝ [sqrt(0.9 * 0.5), sqrt(0.1 * 0.5)] = [sqrt(.45), sqrt(.05)]
    #   = [3 sqrt(.05), sqrt(.05)] -> [0.75, 0.25], a different (more confident) answer.
    members = log([[[0.9, 0.1]], [[0.5, 0.5]]])
    out = ensemble_log_probs(members)
    assert out.shape == (1, 2)
    np.testing.assert_allclose(np.exp(out), [[0.7, 0.3]], rtol=1e-12)

    mean_logits = members.mean(axis=0)
    softmax_of_mean = np.exp(mean_logits) / np.exp(mean_logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax_of_mean, [[0.75, 0.25]], rtol=1e-12)
    assert not np.allclose(np.exp(out), softmax_of_mean)


def test_ensemble_with_padding_has_no_nan():
    # Two members, questions with 2 and 3 options (K_max = 3), plus a member giving p = 0
    # to a real option. Expected: mean of probabilities, -inf exactly where both are 0.
    m1 = [[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]]
    m2 = [[0.6, 0.4, 0.0], [0.5, 0.25, 0.25]]
    with np.errstate(all="raise"):  # no hidden invalid operations either
        out = ensemble_log_probs(log([m1, m2]))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(np.exp(out), [[0.4, 0.6, 0.0], [0.75, 0.125, 0.125]], rtol=1e-12)
    assert out[0, 2] == -np.inf


def test_ensemble_of_one_member_is_the_member():
    out = ensemble_log_probs(LOG_PROBS[None])
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(LOG_PROBS))
    np.testing.assert_allclose(np.exp(out), np.exp(LOG_PROBS), rtol=1e-12)


# --------------------------------------------------------------------------- uncertainty and OOD


def test_predictive_entropy_and_max_prob_hand_values():
    # [0.5, 0.5, pad]: H = ln 2; [1, 0, 0]: H = 0 (0 log 0 = 0); [1/4]*4: H = ln 4.
    lp = log([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4])
    np.testing.assert_allclose(predictive_entropy(lp), [math.log(2), 0.0, math.log(4)], atol=1e-15)
    np.testing.assert_allclose(max_prob(lp), [0.5, 1.0, 0.25])


def test_mutual_information_identical_members_is_zero():
    members = np.stack([LOG_PROBS] * 3)
    np.testing.assert_allclose(mutual_information(members), 0.0, atol=1e-12)


def _entropy(*p: float) -> float:
    return -sum(x * math.log(x) for x in p)


def test_mutual_information_disagreeing_members():
    # Members [1, 0] and [0, 1]: each has entropy 0, the mean [0.5, 0.5] has entropy ln 2,
    # so MI = ln 2. Members [0.9, 0.1] and [0.5, 0.5] disagree mildly: MI > 0.
    members = log([[[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]], [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]])
    mi = mutual_information(members)
    assert not np.isnan(mi).any()
    assert mi[0] == pytest.approx(math.log(2), rel=1e-12)
    expected = _entropy(0.7, 0.3) - (_entropy(0.9, 0.1) + _entropy(0.5, 0.5)) / 2
    assert mi[1] == pytest.approx(expected, rel=1e-12)
    assert mi[1] > 0


def test_disagreement_hand_values():
    # Question 0: members answer 0, 0, 1; the mean [0.5, 0.43, 0.07] answers 0, so 1 of 3 members
    # disagrees. Question 1 (2 options, padded): all answer 1. Question 2: members answer 0, 2,
    # 1 and the ensemble [0.4, 0.35, 0.25] answers 0: 2 of 3 disagree.
    members = log(
        [
            [[0.8, 0.1, 0.1], [0.2, 0.8, 0.0], [0.6, 0.3, 0.1]],
            [[0.6, 0.3, 0.1], [0.4, 0.6, 0.0], [0.3, 0.25, 0.45]],
            [[0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.3, 0.5, 0.2]],
        ]
    )
    np.testing.assert_allclose(disagreement(members), [1 / 3, 0.0, 2 / 3], atol=1e-12)


def test_auroc_perfect_reversed_and_ties():
    assert auroc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert auroc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0
    assert auroc([0.4, 0.4, 0.4], [0.4, 0.4]) == 0.5


def test_auroc_hand_value():
    # in = [0.1, 0.4, 0.35], out = [0.8, 0.4]; count pairs (out, in) with out > in, ties ½:
    #   0.8 beats all three           -> 3
    #   0.4 beats 0.1 and 0.35, ties 0.4 -> 2.5
    # AUROC = 5.5 / (3 * 2) = 0.91667
    assert auroc([0.1, 0.4, 0.35], [0.8, 0.4]) == pytest.approx(5.5 / 6, rel=1e-12)


def test_auroc_with_negative_max_prob_score():
    # The paper's score is -max p_T: confident in-distribution questions, unsure OOD ones.
    ind = log([[0.9, 0.1], [0.8, 0.2]])
    ood = log([[0.5, 0.5], [0.6, 0.4]])
    assert auroc(-max_prob(ind), -max_prob(ood)) == 1.0


def test_auroc_rejects_empty_sets():
    message = "^auroc needs at least one in-distribution and one OOD score$"
    with pytest.raises(ValueError, match=message):
        auroc([], [0.5])
    with pytest.raises(ValueError, match=message):
        auroc([0.5], [])


def test_wrong_confidence_is_the_mean_top_probability_of_the_wrong_answers():
    from loraens.evaluation.metrics import wrong_confidence

    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 0, 1, 1])  # right, wrong (0.8), wrong (0.6), right
    assert wrong_confidence(np.log(p), labels) == pytest.approx((0.8 + 0.6) / 2)
    assert math.isnan(wrong_confidence(np.log(p), np.array([0, 1, 0, 1])))
