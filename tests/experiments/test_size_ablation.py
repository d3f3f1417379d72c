"""Ensemble-size ablation: subset draws, metrics per size, and reading predictions.jsonl."""

import numpy as np
import pytest
from helpers import make_questions

from loraens.data.records import Question
from loraens.evaluation.predictions import write_predictions
from loraens.experiments.size_ablation import (
    ablate_run_size,
    draw_subsets,
    ensemble_size_ablation,
    read_prediction_pool,
)
from loraens.rundir import RunDir


def _pool(p=6, n=40, k=4, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(p, n, k)) * 2.0
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return log_probs, rng.integers(0, k, size=n)


# A hand-worked pool: 3 members, 2 two-option questions (labels a, b). Entries are p(option a).
HAND_P_A = np.array([[0.9, 0.5], [0.6, 0.2], [0.35, 0.75]])
HAND_LABELS = np.array([0, 1])
# Each ensemble's metrics, worked out by hand from the mean probabilities (no ties, and no
# confidence on a 15-bin ECE edge):
#   {0,1}: p(a) = .75, .35 -> both right, confidences .75 and .65 in bins 11 and 9.
#   {0,2}: p(a) = .625, .625 -> first right, second wrong; both .625 in bin 9.
#   {1,2}: p(a) = .475, .475 -> first wrong, second right; both .525 in bin 7.
#   {0,1,2}: p(a) = 1.85/3, 1.45/3 -> both right, confidences 1.85/3 and 1.55/3.
HAND = {
    (0, 1): {
        "accuracy": 1.0,
        "nll": -(np.log(0.75) + np.log(0.65)) / 2,
        "ece": (0.25 + 0.35) / 2,
        "brier": (2 * 0.25**2 + 2 * 0.35**2) / 2,
    },
    (0, 2): {
        "accuracy": 0.5,
        "nll": -(np.log(0.625) + np.log(0.375)) / 2,
        "ece": 0.625 - 0.5,
        "brier": (2 * 0.375**2 + 2 * 0.625**2) / 2,
    },
    (1, 2): {
        "accuracy": 0.5,
        "nll": -(np.log(0.475) + np.log(0.525)) / 2,
        "ece": 0.525 - 0.5,
        "brier": (2 * 0.525**2 + 2 * 0.475**2) / 2,
    },
    (0, 1, 2): {
        "accuracy": 1.0,
        "nll": -(np.log(1.85 / 3) + np.log(1.55 / 3)) / 2,
        "ece": 1 - (1.85 / 3 + 1.55 / 3) / 2,
        "brier": (2 * (1.15 / 3) ** 2 + 2 * (1.45 / 3) ** 2) / 2,
    },
}


def _hand_pool() -> np.ndarray:
    return np.log(np.stack([HAND_P_A, 1 - HAND_P_A], axis=-1))  # (3, 2, 2)


def test_full_pool_size_is_the_full_ensemble_with_zero_std():
    (row,) = ensemble_size_ablation(_hand_pool(), HAND_LABELS, sizes=(3,), draws=5)
    assert row["subsets"] == [(0, 1, 2)] * 5
    assert row["mean"] == pytest.approx(HAND[(0, 1, 2)], rel=1e-12)
    assert row["std"] == {m: 0.0 for m in HAND[(0, 1, 2)]}


def test_sizes_above_the_pool_are_skipped_and_order_kept():
    lp, labels = _pool()
    rows = ensemble_size_ablation(lp, labels)  # default (1, 3, 5, 10, 15)
    assert [r["size"] for r in rows] == [1, 3, 5]
    assert all(r["pool_size"] == 6 and r["draws"] == 5 for r in rows)


def test_subsets_are_without_replacement_and_seeded():
    subsets = draw_subsets(20, 10, draws=50, seed=3)
    assert all(len(set(s)) == 10 and all(0 <= m < 20 for m in s) for s in subsets)
    assert len(set(subsets)) > 1
    assert draw_subsets(20, 10, draws=50, seed=3) == subsets
    assert draw_subsets(20, 10, draws=50, seed=4) != subsets
    with pytest.raises(ValueError):
        draw_subsets(5, 6, draws=1, seed=0)


def test_metrics_are_mean_and_std_over_the_drawn_subsets():
    a = ensemble_size_ablation(_hand_pool(), HAND_LABELS, sizes=(2,), draws=6, seed=7)
    assert ensemble_size_ablation(_hand_pool(), HAND_LABELS, sizes=(2,), draws=6, seed=7) == a
    (row,) = a
    assert len(set(row["subsets"])) > 1  # the check below mixes different pairs
    for metric in HAND[(0, 1)]:
        values = [HAND[s][metric] for s in row["subsets"]]
        assert row["mean"][metric] == pytest.approx(np.mean(values), rel=1e-12)
        assert row["std"][metric] == pytest.approx(np.std(values), rel=1e-9)
    # A size's subsets do not depend on which other sizes are studied.
    rows = ensemble_size_ablation(_hand_pool(), HAND_LABELS, sizes=(1, 2), draws=6, seed=7)
    assert rows[1]["subsets"] == row["subsets"]


def test_ablating_a_runs_predictions_gives_the_hand_worked_metrics(tmp_path):
    questions = [Question(f"q{i}", "?", ("x", "y"), int(y)) for i, y in enumerate(HAND_LABELS)]
    write_predictions(tmp_path / "predictions.jsonl", questions, _hand_pool())
    (row,) = ablate_run_size(tmp_path, sizes=(3,), draws=2)
    # stored probabilities are rounded to 6 decimals
    assert row["mean"] == pytest.approx(HAND[(0, 1, 2)], abs=1e-5)


def test_predictions_jsonl_round_trip(tmp_path):
    questions = make_questions(12, seed=3)  # 3 to 5 options: rows are padded
    k_max = max(len(q.choices) for q in questions)
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, len(questions), k_max))
    n_choices = np.array([len(q.choices) for q in questions])
    logits[:, np.arange(k_max)[None, :] >= n_choices[:, None]] = -np.inf
    lp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    run = RunDir(tmp_path)
    write_predictions(run.predictions, questions, lp)

    pool = read_prediction_pool(tmp_path)  # a run directory or the file itself
    assert pool.ids == [q.id for q in questions]
    assert pool.labels.tolist() == [q.answer for q in questions]
    assert pool.member_log_probs.shape == lp.shape
    assert np.array_equal(np.isinf(pool.member_log_probs), np.isinf(lp))
    np.testing.assert_allclose(np.exp(pool.member_log_probs), np.exp(lp), atol=2e-6)

    rows = ablate_run_size(run.predictions, sizes=(2, 4), draws=3)
    assert [r["size"] for r in rows] == [2, 4] and rows[1]["std"]["nll"] == 0.0


def test_rounded_zero_probabilities_keep_the_nll_finite(tmp_path):
    questions = make_questions(2, seed=0, n_choices=3)
    lp = np.log(np.full((2, 2, 3), 1e-9))
    lp[:, :, 0] = 0.0  # option "a" certain: the others are stored as 0
    lp = lp - np.log(np.exp(lp).sum(axis=-1, keepdims=True))
    write_predictions(tmp_path / "predictions.jsonl", questions, lp)
    floored = read_prediction_pool(tmp_path / "predictions.jsonl")
    assert np.isfinite(floored.member_log_probs).all()
    exact = read_prediction_pool(tmp_path / "predictions.jsonl", rounded_zero=None)
    assert np.isneginf(exact.member_log_probs[:, :, 1:]).all()
