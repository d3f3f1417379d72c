"""Ensemble-size ablation: subset draws, metrics per size, reading the per-epoch log-probs and
falling back to predictions.jsonl (its exact log-probs, or an older file's rounded
probabilities)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_questions
from safetensors.numpy import load_file
from torchmetrics.functional.classification import multiclass_calibration_error

from loraens.data.records import Question
from loraens.evaluation.predictions import write_predictions
from loraens.experiments.size_ablation import (
    SIZE_METRICS,
    SOURCE_LOG_PROBS,
    SOURCE_PREDICTIONS,
    ablate_run_size,
    draw_subsets,
    ensemble_size_ablation,
    read_prediction_pool,
    size_differences,
)
from loraens.rundir import RunDir, RunSummary, read_jsonl


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


def _as_older_file(path: Path) -> None:
    """Turn a predictions.jsonl into one written before the log-probs were added (the committed
    records under docs/results): the rounded probabilities only."""
    rows = [
        {k: v for k, v in row.items() if k not in ("member_log_probs", "ensemble_log_probs")}
        for row in read_jsonl(path)
    ]
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


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
    assert row["mean"] == pytest.approx(HAND[(0, 1, 2)], rel=1e-12)  # from the exact log-probs
    _as_older_file(tmp_path / "predictions.jsonl")
    (row,) = ablate_run_size(tmp_path, sizes=(3,), draws=2)
    assert row["mean"] == pytest.approx(HAND[(0, 1, 2)], abs=1e-5)  # rounded to 6 decimals


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
    assert np.array_equal(pool.member_log_probs, lp)  # every bit, -inf padding included

    rows = ablate_run_size(run.predictions, sizes=(2, 4), draws=3)
    assert [r["size"] for r in rows] == [2, 4] and rows[1]["std"]["nll"] == 0.0

    _as_older_file(run.predictions)
    older = read_prediction_pool(run.predictions)
    assert older.ids == pool.ids and np.array_equal(older.labels, pool.labels)
    assert older.member_log_probs.shape == lp.shape
    assert np.array_equal(np.isinf(older.member_log_probs), np.isinf(lp))
    np.testing.assert_allclose(np.exp(older.member_log_probs), np.exp(lp), atol=2e-6)


def test_rounded_zero_probabilities_keep_the_nll_finite(tmp_path):
    questions = make_questions(2, seed=0, n_choices=3)
    lp = np.log(np.full((2, 2, 3), 1e-9))
    lp[:, :, 0] = 0.0  # option "a" certain: the others are stored as 0
    lp = lp - np.log(np.exp(lp).sum(axis=-1, keepdims=True))
    path = tmp_path / "predictions.jsonl"
    write_predictions(path, questions, lp)
    # The log-probs keep 1e-9 whatever rounded_zero says.
    assert np.array_equal(read_prediction_pool(path, rounded_zero=None).member_log_probs, lp)

    _as_older_file(path)
    floored = read_prediction_pool(path)
    assert np.isfinite(floored.member_log_probs).all()
    zeros = read_prediction_pool(path, rounded_zero=None)
    assert np.isneginf(zeros.member_log_probs[:, :, 1:]).all()


# ----------------------------------------------------------------------------- per-epoch file


def _by_hand(lp: np.ndarray, labels: np.ndarray, members: tuple[int, ...]) -> tuple[float, float]:
    """Accuracy and NLL of the probability average of ``members``, with numpy alone."""
    chosen = lp[list(members)].astype(np.float64)
    top = chosen.max(axis=0)
    mixed = top + np.log(np.exp(chosen - top).mean(axis=0))  # logsumexp - log M
    nll = -mixed[np.arange(len(labels)), labels].mean()
    return float((mixed.argmax(axis=1) == labels).mean()), float(nll)


def _write_epochs(run: RunDir, epochs=(1, 2, 4), p=6, n=30, k=4):
    rng = np.random.default_rng(11)
    labels = rng.integers(0, k, size=n)
    written = {}
    for e in epochs:
        logits = rng.normal(size=(p, n, k)) * e  # sharper each epoch: the epochs differ
        lp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        run.write_eval_log_probs(e, lp, labels)
        written[e] = lp
    return written, labels


def test_ablation_from_the_log_prob_file_matches_numpy_per_epoch(tmp_path):
    run = RunDir(tmp_path)
    _write_epochs(run)
    saved = load_file(run.eval_log_probs)  # the tensors as stored (float32)
    assert saved["epoch-0001"].dtype == np.float32 and saved["epoch-0001"].shape == (6, 30, 4)
    labels = saved["labels"]

    rows = ablate_run_size(tmp_path, sizes=(1, 3, 6), draws=4, seed=2)
    assert [(r["epoch"], r["size"]) for r in rows] == [(e, m) for e in (1, 2, 4) for m in (1, 3, 6)]
    assert {r["source"] for r in rows} == {SOURCE_LOG_PROBS}
    for row in rows:
        lp = saved[f"epoch-{row['epoch']:04d}"]
        per_subset = [_by_hand(lp, labels, s) for s in row["subsets"]]
        assert all(len(set(s)) == row["size"] for s in row["subsets"])
        assert row["mean"]["accuracy"] == pytest.approx(np.mean([a for a, _ in per_subset]))
        assert row["mean"]["nll"] == pytest.approx(np.mean([n for _, n in per_subset]), 1e-9)
        assert row["std"]["nll"] == pytest.approx(np.std([n for _, n in per_subset]), abs=1e-9)
    # A hand-chosen subset: M = 6 is the whole pool, at each epoch its own numbers.
    full = {r["epoch"]: r for r in rows if r["size"] == 6}
    for e in (1, 2, 4):
        acc, nll = _by_hand(saved[f"epoch-{e:04d}"], labels, tuple(range(6)))
        assert full[e]["mean"]["accuracy"] == acc
        assert full[e]["mean"]["nll"] == pytest.approx(nll, 1e-9)
    assert len({full[e]["mean"]["nll"] for e in (1, 2, 4)}) == 3
    # One M's subsets are the same at every epoch: a curve follows the same ensembles.
    three = [r["subsets"] for r in rows if r["size"] == 3]
    assert three[0] == three[1] == three[2]


def test_rewriting_an_epoch_keeps_earlier_ones_and_drops_later_ones(tmp_path):
    run = RunDir(tmp_path)
    written, labels = _write_epochs(run, epochs=(1, 2, 3))
    # A resumed run redoes epoch 2: its entry is replaced and epoch 3 (from before) dropped.
    redo = written[2] - 0.5
    run.write_eval_log_probs(2, redo, labels)
    saved = run.read_eval_log_probs()
    assert saved.epochs == [1, 2]
    np.testing.assert_array_equal(saved.at(1), written[1].astype(np.float32))
    np.testing.assert_array_equal(saved.at(2), redo.astype(np.float32))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # written atomically


def test_a_run_without_the_log_prob_file_falls_back_to_its_final_predictions(tmp_path):
    questions = make_questions(20, seed=4, n_choices=4)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 20, 4)) * 2
    lp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    run = RunDir(tmp_path)
    write_predictions(run.predictions, questions, lp)
    run.write_summary(
        RunSummary(
            table={}, train_questions=8, eval_questions=20, train_seconds=1.0,
            train_tokens_per_second=1.0, wall_seconds=1.0, precision="fp32", device="cpu",
            epochs_trained=5, epoch_kept=3,
        )
    )  # fmt: skip
    labels = np.array([q.answer for q in questions])

    rows = ablate_run_size(tmp_path, sizes=(2, 4), draws=3)
    assert [(r["epoch"], r["size"], r["source"]) for r in rows] == [
        (3, 2, SOURCE_PREDICTIONS),  # the kept epoch, which predictions.jsonl holds
        (3, 4, SOURCE_PREDICTIONS),
    ]
    acc, nll = _by_hand(lp, labels, (0, 1, 2, 3))
    assert rows[1]["mean"]["accuracy"] == acc
    assert rows[1]["mean"]["nll"] == pytest.approx(nll, rel=1e-12)
    # The file itself given: no epoch to name.
    assert ablate_run_size(run.predictions, sizes=(4,), draws=1)[0]["epoch"] is None


def _subset(pool_size, size):
    """The documented draw of one size-M subset: ``default_rng([seed, M])``, seed 0."""
    return np.random.default_rng([0, size]).choice(pool_size, size=size, replace=False)


def test_size_differences_match_a_brute_force_bootstrap_over_seeds():
    """Each size's gain equals a loop over resamples, seeds, subsets and members written out
    here, from the documented question draws (``default_rng(0).integers``) and subsets."""
    pools = [_pool(p=4, n=25, k=3, seed=s)[0] for s in (1, 2)]
    labels = _pool(p=4, n=25, k=3, seed=3)[1]
    resamples = 300
    got = size_differences(pools, labels, sizes=(1, 3, 4, 7), draws=1, n_resamples=resamples)
    assert [(d.size, d.versus, d.metric) for d in got] == [
        (m, v, metric) for m, v in ((3, 1), (4, 1), (4, 3)) for metric in SIZE_METRICS
    ]

    def members_of(pool, size):  # the size-M model's arrays: every member, or one subset's ensemble
        if size == 1:
            return list(pool)
        probs = np.exp(pool[_subset(len(pool), size)]).mean(axis=0)
        return [np.log(probs)]

    def nll(lp, rows):
        return float(np.mean(-lp[rows, labels[rows]]))

    def accuracy(lp, rows):
        return float(np.mean(lp[rows].argmax(axis=1) == labels[rows]))

    draws = np.random.default_rng(0).integers(0, 25, size=(resamples, 25))
    everything = np.arange(25)
    for d in got:
        if d.metric == "ece":
            continue
        score = nll if d.metric == "nll" else accuracy

        def gain(rows, d=d, score=score):
            return np.mean(
                [
                    np.mean([score(x, rows) for x in members_of(pool, d.size)])
                    - np.mean([score(x, rows) for x in members_of(pool, d.versus)])
                    for pool in pools
                ]
            )

        assert d.difference.estimate == pytest.approx(gain(everything), abs=1e-12)
        resampled = [gain(rows) for rows in draws]
        low, high = np.percentile(resampled, [2.5, 97.5])
        assert (d.difference.low, d.difference.high) == pytest.approx((low, high), abs=1e-12)
        assert d.difference.n_seeds == 2


def test_size_differences_ece_is_torchmetrics_on_each_subset_ensemble():
    pools = [_pool(p=5, n=60, k=4, seed=s)[0] for s in (4, 5)]
    labels = _pool(p=5, n=60, k=4, seed=6)[1]
    got = size_differences(pools, labels, sizes=(3,), draws=2, n_resamples=20)
    (ece,) = [d for d in got if d.metric == "ece" and d.size == 3]

    def tm_ece(lp):
        return multiclass_calibration_error(
            torch.from_numpy(np.exp(lp)), torch.from_numpy(labels), num_classes=4, n_bins=15
        ).item()

    subsets = draw_subsets(5, 3, 2, 0)
    expected = np.mean(
        [
            np.mean([tm_ece(np.log(np.exp(pool[list(s)]).mean(axis=0))) for s in subsets])
            - np.mean([tm_ece(member) for member in pool])
            for pool in pools
        ]
    )
    assert ece.difference.estimate == pytest.approx(expected, abs=1e-6)


def test_size_differences_need_pools_of_one_shape():
    a, labels = _pool(p=4, n=10, k=3)
    with pytest.raises(ValueError, match="one shape"):
        size_differences([a, a[:3]], labels, sizes=(3,))
