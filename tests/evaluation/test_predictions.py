"""predictions.jsonl on its own reproduces the run's metrics: the log-probs it stores read back
bit-identical, and accuracy, NLL, ECE and Brier recomputed from them here, independently of
loraens.evaluation.metrics (numpy and scikit-learn), equal summary.json's, metrics.jsonl's and
few_shot.json's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import make_questions, train_argv
from scipy.special import logsumexp, softmax
from sklearn.metrics import brier_score_loss, log_loss

from loraens.cli.main import main
from loraens.evaluation.predictions import write_predictions
from loraens.experiments.runner import cell_dir, run_experiment
from loraens.experiments.spec import load_experiment
from loraens.rundir import read_jsonl

N_BINS = 15
# Sums over questions may be ordered differently here than in loraens: equal to ~1e-15.
CLOSE = {"rel": 1e-9, "abs": 1e-12}


def _padded(rows: list[list[float]]) -> np.ndarray:
    """Per-question probability rows of different lengths as (N, K_max), zero-padded."""
    out = np.zeros((len(rows), max(len(r) for r in rows)))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The four headline metrics by their definitions, not by loraens' code."""
    classes = list(range(probs.shape[1]))
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == labels
    # 15 equal-width bins [k/15, (k+1)/15), the last one closed at 1.
    bins = np.minimum(np.digitize(confidence, np.linspace(0, 1, N_BINS + 1)) - 1, N_BINS - 1)
    ece = sum(
        abs(correct[bins == b].mean() - confidence[bins == b].mean()) * np.mean(bins == b)
        for b in np.unique(bins)
    )
    return {
        "accuracy": float(correct.mean()),
        "nll": log_loss(labels, probs, labels=classes),
        "ece": float(ece),
        "brier": brier_score_loss(labels, probs, labels=classes, scale_by_half=False),
    }


def _tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) over each question's options (zero padding stays zero)."""
    with np.errstate(divide="ignore"):
        return softmax(np.log(probs) / temperature, axis=-1)


def _from_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M, N, K_max) member probabilities, (N, K_max) ensemble probabilities as the file stores
    them, and the labels: from the file's log-probs alone."""
    rows = read_jsonl(path)
    members = np.stack(
        [
            _padded([np.exp(row["member_log_probs"][m]).tolist() for row in rows])
            for m in range(len(rows[0]["member_log_probs"]))
        ]
    )
    ensemble = _padded([np.exp(row["ensemble_log_probs"]).tolist() for row in rows])
    return members, ensemble, np.asarray([row["answer"] for row in rows])


def _random_log_probs(questions, members: int, seed: int, scale: float = 3.0) -> np.ndarray:
    """(M, N, K_max) log p_T, -inf past each question's options."""
    k_max = max(len(q.choices) for q in questions)
    logits = np.random.default_rng(seed).normal(size=(members, len(questions), k_max)) * scale
    n_choices = np.array([len(q.choices) for q in questions])
    logits[:, np.arange(k_max)[None, :] >= n_choices[:, None]] = -np.inf
    return logits - logsumexp(logits, axis=-1, keepdims=True)


def test_log_probs_read_back_bit_identical_next_to_the_rounded_probabilities(tmp_path):
    questions = make_questions(20, seed=4)  # 3 to 5 options
    lp = _random_log_probs(questions, members=3, seed=1, scale=12.0)  # p down to ~1e-30
    path = tmp_path / "predictions.jsonl"
    write_predictions(path, questions, lp)

    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == [q.id for q in questions]
    ensemble = logsumexp(lp, axis=0) - np.log(3)  # Eq. 2: the mean of the probabilities
    for i, (row, q) in enumerate(zip(rows, questions, strict=True)):
        k = len(q.choices)
        assert np.array_equal(row["member_log_probs"], lp[:, i, :k])  # every bit
        np.testing.assert_allclose(row["ensemble_log_probs"], ensemble[i, :k], rtol=1e-13)
        # The readable numbers are still there, and still rounded.
        assert row["member_probs"] == np.exp(lp[:, i, :k]).round(6).tolist()
        assert row["ensemble_probs"] == pytest.approx(np.exp(ensemble[i, :k]), abs=5e-7)
    assert min(min(p) for r in rows for p in r["member_probs"]) == 0.0  # rounded away


def test_a_label_probability_below_the_rounding_keeps_its_nll(tmp_path):
    # The reason for the log-probs: p(label) = 1e-9 is stored as 0 in member_probs.
    questions = make_questions(6, seed=0, n_choices=3)
    labels = np.array([q.answer for q in questions])
    lp = np.log(np.full((2, 6, 3), 1e-9))
    lp[:, np.arange(6), (labels + 1) % 3] = 0.0  # each member all but certain of a wrong option
    lp -= logsumexp(lp, axis=-1, keepdims=True)
    write_predictions(tmp_path / "predictions.jsonl", questions, lp)

    members, ensemble, stored_labels = _from_file(tmp_path / "predictions.jsonl")
    assert np.array_equal(stored_labels, labels)
    assert _metrics(members[0], labels)["nll"] == pytest.approx(-np.log(1e-9), rel=1e-9)
    assert _metrics(ensemble, labels)["nll"] == pytest.approx(-np.log(1e-9), rel=1e-9)
    rounded = _padded(
        [row["member_probs"][0] for row in read_jsonl(tmp_path / "predictions.jsonl")]
    )
    assert (rounded[np.arange(6), labels] == 0).all()


def _check_against(members: np.ndarray, ensemble: np.ndarray, labels: np.ndarray, table: dict):
    """summary.json's table (or few_shot.json's mean / std) against the file's numbers."""
    each = [_metrics(p, labels) for p in members]
    ensemble_by_hand = _metrics(members.mean(axis=0), labels)  # Eq. 2 from the members
    for metric in ("accuracy", "nll", "ece", "brier"):
        values = [m[metric] for m in each]
        assert table["single (mean)"][metric] == pytest.approx(np.mean(values), **CLOSE)
        assert table["single (std)"][metric] == pytest.approx(np.std(values), **CLOSE)
        ens = next(v for k, v in table.items() if k.startswith("ensemble (M="))
        assert ens[metric] == pytest.approx(ensemble_by_hand[metric], **CLOSE), metric
        assert ens[metric] == pytest.approx(_metrics(ensemble, labels)[metric], **CLOSE)
    return each


# Patience keeps an earlier epoch than the last, and fits temperatures on its held-out questions:
# summary.json then has "+ TS" rows too.
@pytest.mark.parametrize("extra", [(), ("--optim.patience", "1", "--optim.epochs", "3")])
def test_a_training_runs_file_reproduces_its_summary(
    extra, tiny_model_dir, questions_files, tmp_path, one_thread
):
    train, evaluation = questions_files
    out = tmp_path / "run"
    main(train_argv(tiny_model_dir, train, evaluation, out, *extra, "--runtime.precision", "fp32"))
    summary = json.loads((out / "summary.json").read_text())
    members, ensemble, labels = _from_file(out / "predictions.jsonl")
    assert members.shape[:2] == (3, 12)

    each = _check_against(members, ensemble, labels, summary["table"])
    # Every member, at the epoch kept (metrics.jsonl's rows of that epoch).
    kept = [
        r
        for r in read_jsonl(out / "metrics.jsonl")
        if r["split"] == "eval" and r["epoch"] == summary["epoch_kept"]
    ]
    for row in kept:
        mine = _metrics(ensemble, labels) if row["member"] == "ensemble" else each[row["member"]]
        assert {k: row[k] for k in mine} == pytest.approx(mine, **CLOSE), row["member"]
    assert len(kept) == 4

    table = summary["table"]
    assert ("ensemble + TS" in table) == bool(extra)
    if extra:  # with calibration.json's temperatures
        calibration = json.loads((out / "calibration.json").read_text())
        scaled = [
            _metrics(_tempered(p, t), labels)
            for p, t in zip(members, calibration["member_temperatures"], strict=True)
        ]
        t_ensemble = calibration["ensemble_temperature"]
        ensemble_scaled = _metrics(_tempered(members.mean(axis=0), t_ensemble), labels)
        for metric, value in table["single + TS"].items():
            assert value == pytest.approx(np.mean([m[metric] for m in scaled]), **CLOSE)
        assert table["ensemble + TS"] == pytest.approx(ensemble_scaled, **CLOSE)


def test_a_few_shot_cells_file_reproduces_its_draws(tiny_model_dir, tmp_path, one_thread):
    """Few-shot cells write the same file, one "member" per demonstration draw."""
    spec = {
        "name": "tiny",
        "base": {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train_limit": 8, "eval_limit": 6},
            "runtime": {"progress": False, "precision": "fp32"},
        },
        "tasks": ["obqa"],
        "cells": {"few_shot": {"kind": "few_shot", "k": 1, "draws": 2}},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(spec))
    experiment = load_experiment(tmp_path / "exp.yaml")
    run_experiment(experiment, experiment.cells, tmp_path / "runs")
    folder = cell_dir(tmp_path / "runs", experiment, experiment.cells[0])

    result = json.loads((folder / "few_shot.json").read_text())
    members, ensemble, labels = _from_file(folder / "predictions.jsonl")
    assert members.shape[:2] == (2, 6)
    for draw, probs in zip(result["per_draw"], members, strict=True):
        mine = _metrics(probs, labels)
        assert {k: draw[k] for k in mine} == pytest.approx(mine, **CLOSE)
    table = {"single (mean)": result["mean"], "single (std)": result["std"]}
    # few_shot.json has no ensemble row: give the check the file's own, checked against Eq. 2.
    table["ensemble (M=2)"] = _metrics(ensemble, labels)
    _check_against(members, ensemble, labels, table)
