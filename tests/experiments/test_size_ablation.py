"""Ensemble-size ablation: subset draws, metrics per size, and reading predictions.jsonl."""

import numpy as np
import pytest
from helpers import make_questions

from loraens.evaluation.metrics import ensemble_log_probs, summarize
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


def test_full_pool_size_is_the_full_ensemble_with_zero_std():
    lp, labels = _pool()
    (row,) = ensemble_size_ablation(lp, labels, sizes=(6,), draws=5)
    assert row["subsets"] == [tuple(range(6))] * 5
    full = summarize(ensemble_log_probs(lp), labels)
    assert row["mean"] == full
    assert row["std"] == {m: 0.0 for m in full}


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
    lp, labels = _pool(seed=1)
    a = ensemble_size_ablation(lp, labels, sizes=(2,), draws=4, seed=7)
    assert ensemble_size_ablation(lp, labels, sizes=(2,), draws=4, seed=7) == a
    (row,) = a
    scores = [summarize(ensemble_log_probs(lp[list(s)]), labels) for s in row["subsets"]]
    for metric in row["mean"]:
        assert row["mean"][metric] == pytest.approx(np.mean([s[metric] for s in scores]))
        assert row["std"][metric] == pytest.approx(np.std([s[metric] for s in scores]))
    # A size's subsets do not depend on which other sizes are studied.
    rows = ensemble_size_ablation(lp, labels, sizes=(1, 2), draws=4, seed=7)
    assert rows[1]["subsets"] == row["subsets"]


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
    assert rows[1]["mean"] == pytest.approx(summarize(ensemble_log_probs(lp), pool.labels), 1e-4)


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
