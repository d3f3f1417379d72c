"""The report's differences table (differences.csv): every number recomputed here from the run
files of synthetic runs with two seeds, with a bootstrap written out independently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp
from scipy.stats import entropy
from test_report import read_csv, write_few_shot_run, write_train_run
from test_report_decisions import ENSEMBLE_T, MEMBER_T, _calibrate

from loraens.experiments.report import write_report
from loraens.experiments.size_ablation import read_prediction_pool
from loraens.rundir import RunDir

RESAMPLES = 2000  # the report's default
ENSEMBLE_GAIN = "ensemble − mean single member"
VERSUS = "method − reference ensemble"
DIVERSITY = "members' diversity: method − reference"
SIZE = "ensemble size: M members − fewer"
N_BINS = 15


# ----------------------------------------------------------------------------- recomputation


def _final(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(M, N, K) log-probs of a run's last epoch (the kept one here) and the labels."""
    saved = RunDir(run).read_eval_log_probs()
    return saved.member_log_probs[-1], np.asarray(saved.labels)


def _ensemble(lp: np.ndarray) -> np.ndarray:
    return logsumexp(lp, axis=0) - math.log(lp.shape[0])


def _resampled(stack: np.ndarray, y: np.ndarray, metric: str, idx: np.ndarray) -> np.ndarray:
    """(R + 1,) the metric, averaged over the stack's arrays, on all questions (row 0) and on
    every resample (rows of ``idx``), by gathering the resampled questions."""
    rows = np.vstack([np.arange(len(y)), idx])
    out = []
    for x in stack:
        p = np.exp(x)
        right = x.argmax(axis=1) == y
        if metric == "accuracy":
            out.append(right[rows].mean(axis=1))
        elif metric == "nll":
            out.append(-x[np.arange(len(y)), y][rows].mean(axis=1))
        elif metric == "wrong_confidence":  # mean top probability over the wrong answers drawn
            conf, wrong = p.max(axis=1)[rows], ~right[rows]
            with np.errstate(invalid="ignore"):  # a resample with no wrong answer: NaN
                out.append((conf * wrong).sum(axis=1) / wrong.sum(axis=1))
        elif metric == "brier":
            onehot = np.eye(x.shape[1])[y]
            out.append(((p - onehot) ** 2).sum(axis=1)[rows].mean(axis=1))
        else:  # ECE: top-label confidence, 15 equal-width bins, |Σ (right − conf)| per bin / N
            conf = p.max(axis=1)
            bins = np.minimum((conf * N_BINS).astype(int), N_BINS - 1)
            gap = (right - conf)[rows]
            out.append(
                sum(np.abs((gap * (bins[rows] == b)).sum(axis=1)) for b in range(N_BINS)) / len(y)
            )
    return np.mean(out, axis=0)


def _expected(a: list[np.ndarray], b: list[np.ndarray], y: np.ndarray, metric: str) -> dict:
    """A − B over seeds (each model an (N, K) array or a (J, N, K) stack): the estimate, the
    per-seed values and the percentile interval from the report's documented draws."""
    idx = np.random.default_rng(0).integers(0, len(y), size=(RESAMPLES, len(y)))
    diffs = np.array(
        [
            _resampled(x if x.ndim == 3 else x[None], y, metric, idx)
            - _resampled(z if z.ndim == 3 else z[None], y, metric, idx)
            for x, z in zip(a, b, strict=True)
        ]
    )
    low, high = np.percentile(diffs[:, 1:].mean(axis=0), [2.5, 97.5])
    return {"per_seed": diffs[:, 0], "difference": diffs[:, 0].mean(), "low": low, "high": high}


def _check(row: dict, expected: dict, seeds: str, tol: float = 1e-9) -> None:
    per_seed = expected["per_seed"]
    assert row["seeds"] == seeds and int(row["n_seeds"]) == len(per_seed)
    for key in ("difference", "low", "high"):
        assert float(row[key]) == pytest.approx(expected[key], abs=tol, nan_ok=True), (
            row["a"],
            key,
        )
    assert float(row["seed_min"]) == pytest.approx(per_seed.min(), abs=tol)
    assert float(row["seed_max"]) == pytest.approx(per_seed.max(), abs=tol)
    if len(per_seed) > 1:
        assert float(row["seed_sd"]) == pytest.approx(np.std(per_seed, ddof=1), abs=tol)
    shown = expected["low"] > 0 or expected["high"] < 0
    assert row["verdict"] == ("shown" if shown else "not shown")
    assert int(row["resamples"]) == RESAMPLES


# ----------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def differences(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    arce = root / "arce"
    runs = {}
    for seed in (0, 1):
        runs["ref", seed] = write_train_run(arce / "none" / f"s{seed}", seed=seed, epochs=3)
        runs["kl", seed] = write_train_run(
            arce / "kl" / f"s{seed}", seed=seed, epochs=3, kl_beta=0.05
        )
        runs["last", seed] = write_train_run(
            arce / "last" / f"s{seed}", seed=seed, epochs=3, method="last_layer"
        )
    # Another KL strength (one seed; Fig. 1a's choice by the lowest ensemble NLL decides which
    # KL strength is compared), MC dropout on seed 0 only, seed 5 of nothing the reference has.
    runs["kl2", 0] = write_train_run(arce / "kl2" / "s0", epochs=3, kl_beta=0.1)
    runs["mc", 0] = write_train_run(arce / "mc" / "s0", epochs=3, method="mc_dropout", dropout=0.1)
    runs["lora_do", 0] = write_train_run(arce / "lora_do" / "s0", epochs=3, dropout=0.1)
    write_train_run(arce / "lonely" / "s5", seed=5, epochs=3, weight_decay=100.0, decay_target="A")
    # B-decay scored on 30 questions, not the reference's 40: not comparable.
    write_train_run(arce / "b" / "s0", epochs=3, weight_decay=100.0, decay_target="B", n_eval=30)
    runs["few", 0] = write_few_shot_run(arce / "few_shot")
    _calibrate(runs["ref", 0])  # temperature scaling on seed 0 only
    index = write_report([root], tmp_path_factory.mktemp("report"))
    rows = read_csv(index.parent / "differences.csv")
    return runs, rows, index.read_text()


def _rows(rows: list[dict], a: str) -> dict[str, dict]:
    chosen = {r["metric"]: r for r in rows if r["a"] == a and r["claim"] == VERSUS}
    assert chosen, f"no rows for {a!r} in {sorted({r['a'] for r in rows})}"
    return chosen


def test_ensemble_minus_mean_single_member_over_both_seeds(differences):
    runs, rows, _ = differences
    finals = [_final(runs["ref", s]) for s in (0, 1)]
    y = finals[0][1]
    chosen = {
        r["metric"]: r
        for r in rows
        if r["claim"] == "ensemble − mean single member" and r["a"] == "LoRA ens. (M=3)"
    }
    assert set(chosen) == {"nll", "ece", "accuracy", "brier", "wrong_confidence"}
    for metric, row in chosen.items():
        ens = [_ensemble(lp) for lp, _ in finals]
        _check(row, _expected(ens, [lp for lp, _ in finals], y, metric), "0 1")
        assert row["a"] == "LoRA ens. (M=3)" and row["b"] == "mean single member"
        assert int(row["questions"]) == 40


def test_other_methods_minus_the_reference_ensemble_pair_by_seed(differences):
    runs, rows, _ = differences
    finals = {s: _final(runs["ref", s]) for s in (0, 1)}
    y = finals[0][1]
    ref = {s: _ensemble(lp) for s, (lp, _) in finals.items()}

    def nll(path):
        return json.loads((path / "summary.json").read_text())["table"]["ensemble (M=3)"]["nll"]

    # The KL strength compared is the one with the lower ensemble NLL (mean over its seeds).
    kl_nll = np.mean([nll(runs["kl", s]) for s in (0, 1)])
    kl = ("kl", (0, 1), "KL β=0.05") if kl_nll < nll(runs["kl2", 0]) else ("kl2", (0,), "KL β=0.1")
    compared = [
        kl,
        ("last", (0, 1), "last-layer ens."),
        ("mc", (0,), "MC dropout 0.1"),
        ("lora_do", (0,), "LoRA ens. + dropout 0.1"),  # Fig. 4's partner of MC dropout
    ]
    for key, seeds, label in compared:
        chosen = _rows(rows, f"{label} (M=3)")
        assert set(chosen) == {"nll", "ece", "accuracy"}
        models = [_ensemble(_final(runs[key, s])[0]) for s in seeds]
        for metric, row in chosen.items():
            assert row["claim"] == "method − reference ensemble"
            assert row["b"] == "LoRA ens. (M=3)"
            expected = _expected(models, [ref[s] for s in seeds], y, metric)
            _check(row, expected, " ".join(map(str, seeds)))

    # Few-shot: the mean over its 3 draws (from the rounded predictions.jsonl), seed 0.
    draws = read_prediction_pool(runs["few", 0]).member_log_probs
    for metric, row in _rows(rows, "few-shot k=3 (mean of 3 draws)").items():
        _check(row, _expected([draws], [ref[0]], y, metric), "0")

    # Temperature scaling of the reference ensemble, where it is calibrated (seed 0).
    scaled = log_softmax(ref[0] / ENSEMBLE_T, axis=1)
    for metric, row in _rows(rows, "LoRA ens. (M=3) + TS").items():
        _check(row, _expected([scaled], [ref[0]], y, metric), "0")
        if metric == "accuracy":  # TS never changes the answer
            assert float(row["difference"]) == 0.0 and row["verdict"] == "not shown"


def test_ensemble_gain_after_temperature_scaling_scales_each_member_by_its_own_t(differences):
    runs, rows, _ = differences
    lp, y = _final(runs["ref", 0])
    chosen = {
        r["metric"]: r
        for r in rows
        if r["claim"] == ENSEMBLE_GAIN and r["a"] == "LoRA ens. (M=3) + TS"
    }
    assert set(chosen) == {"nll", "ece", "accuracy", "brier", "wrong_confidence"}
    ensemble = log_softmax(_ensemble(lp) / ENSEMBLE_T, axis=1)
    members = np.stack([log_softmax(x / t, axis=1) for x, t in zip(lp, MEMBER_T, strict=True)])
    for metric, row in chosen.items():
        assert row["b"] == "mean single member + TS"
        _check(row, _expected([ensemble], [members], y, metric), "0")


def test_over_confidence_is_the_mean_member_last_minus_first_epoch(differences):
    runs, rows, _ = differences
    chosen = {r["metric"]: r for r in rows if r["claim"] == "over-confidence: last − first epoch"}
    assert set(chosen) == {"nll", "ece", "wrong_confidence"}
    saved = [RunDir(runs["ref", s]).read_eval_log_probs() for s in (0, 1)]
    y = np.asarray(saved[0].labels)
    for metric, row in chosen.items():
        assert (row["a"], row["b"]) == (
            "mean single member, epoch 3",
            "mean single member, epoch 1",
        )
        last = [s.member_log_probs[-1] for s in saved]
        first = [s.member_log_probs[0] for s in saved]
        _check(row, _expected(last, first, y, metric), "0 1")


def test_every_compared_ensemble_gets_its_own_gain_over_its_members(differences):
    runs, rows, _ = differences
    y = _final(runs["last", 0])[1]
    for key, seeds, label in (
        ("last", (0, 1), "last-layer ens."),
        ("mc", (0,), "MC dropout 0.1"),
        ("lora_do", (0,), "LoRA ens. + dropout 0.1"),
    ):
        finals = [_final(runs[key, s])[0] for s in seeds]
        chosen = {
            r["metric"]: r
            for r in rows
            if r["a"] == f"{label} (M=3)" and r["claim"] == "ensemble − mean single member"
        }
        assert set(chosen) == {"nll", "ece", "accuracy", "brier", "wrong_confidence"}
        for metric, row in chosen.items():
            assert row["b"] == "its mean single member"
            expected = _expected([_ensemble(lp) for lp in finals], finals, y, metric)
            _check(row, expected, " ".join(map(str, seeds)))


def _diversity(members: np.ndarray, measure: str, rows: np.ndarray) -> np.ndarray:
    """(R + 1,) the members' mean diversity on all questions (row 0) and on every resample:
    mutual information from scipy's entropy, or the share of members not answering as the
    ensemble does."""
    p = np.exp(members)  # (M, N, K)
    mean = p.mean(axis=0)
    if measure == "mutual_information":
        per_question = entropy(mean, axis=1) - entropy(p, axis=2).mean(axis=0)
    else:
        per_question = (p.argmax(axis=2) != mean.argmax(axis=1)).mean(axis=0)
    return per_question[rows].mean(axis=1)


def test_every_compared_ensemble_gets_its_members_diversity_against_the_reference(differences):
    runs, rows, _ = differences
    y = _final(runs["ref", 0])[1]
    idx = np.random.default_rng(0).integers(0, len(y), size=(RESAMPLES, len(y)))
    every = np.vstack([np.arange(len(y)), idx])
    for key, seeds, label in (
        ("last", (0, 1), "last-layer ens."),
        ("mc", (0,), "MC dropout 0.1"),
        ("lora_do", (0,), "LoRA ens. + dropout 0.1"),
    ):
        chosen = {
            r["metric"]: r for r in rows if r["a"] == f"{label} (M=3)" and r["claim"] == DIVERSITY
        }
        assert set(chosen) == {"mutual_information", "disagreement"}
        for measure, row in chosen.items():
            assert row["b"] == "LoRA ens. (M=3)"
            diffs = np.array(
                [
                    _diversity(_final(runs[key, s])[0], measure, every)
                    - _diversity(_final(runs["ref", s])[0], measure, every)
                    for s in seeds
                ]
            )
            low, high = np.percentile(diffs[:, 1:].mean(axis=0), [2.5, 97.5])
            expected = {"per_seed": diffs[:, 0], "difference": diffs[:, 0].mean()}
            # scipy's entropy renormalises each member's float32-stored distribution (sums off
            # by ~1e-7); the report takes them as stored: agreement to 1e-7, not 1e-9.
            _check(row, expected | {"low": low, "high": high}, " ".join(map(str, seeds)), 1e-7)
    # Early stopping and temperature scaling have no members of their own to compare.
    assert not [
        r for r in rows if r["claim"] == DIVERSITY and ("stopped" in r["a"] or "TS" in r["a"])
    ]


def test_early_stopping_is_the_reference_ensemble_at_an_earlier_epoch(differences):
    runs, rows, _ = differences
    saved = [RunDir(runs["ref", s]).read_eval_log_probs() for s in (0, 1)]
    y = np.asarray(saved[0].labels)
    final = [_ensemble(s.member_log_probs[-1]) for s in saved]
    for epoch in (1, 2):  # the runs evaluated epochs 1, 2, 3; the last is the reference itself
        stopped = [_ensemble(s.at(epoch)) for s in saved]
        chosen = _rows(rows, f"LoRA ens. (M=3) stopped after epoch {epoch}")
        assert set(chosen) == {"nll", "ece", "accuracy"}
        for metric, row in chosen.items():
            _check(row, _expected(stopped, final, y, metric), "0 1")
    assert not [r for r in rows if r["a"] == "LoRA ens. (M=3) stopped after epoch 3"]


def test_runs_that_cannot_be_paired_are_left_out_with_the_reason(differences):
    _, rows, page = differences
    names = {r["a"] for r in rows}
    assert not any(n.startswith(("B-decay", "A-decay")) for n in names)
    assert (
        "B-decay λ=100 (M=3) − LoRA ens. (M=3): seed 0 was scored on other eval questions" in page
    )
    assert "A-decay λ=100 (M=3) − LoRA ens. (M=3): no run with the reference&#x27;s seed(s)" in page
    # The page shows the table, verdicts included.
    assert 'id="differences"' in page and "not shown" in page


def test_ensemble_size_rows_recompute_from_the_subsets_of_every_seed(tmp_path):
    """A 6-member pool: M = 3 and 5 (the same 5 random subsets on both seeds, drawn as Fig. 6
    documents) and the whole pool, each against the mean member and the next smaller size."""
    for seed in (0, 1):
        write_train_run(tmp_path / "runs" / f"s{seed}", seed=seed, members=6)
    write_report([tmp_path / "runs"], tmp_path / "report")
    rows = [r for r in read_csv(tmp_path / "report" / "differences.csv") if r["claim"] == SIZE]
    finals = [_final(tmp_path / "runs" / f"s{seed}") for seed in (0, 1)]
    y = finals[0][1]

    def model(size: int) -> list[np.ndarray]:
        if size == 1:
            return [lp for lp, _ in finals]
        rng = np.random.default_rng([0, size])  # one generator per size, five draws from it
        subsets = [rng.choice(6, size=size, replace=False) for _ in range(5)]
        return [np.stack([_ensemble(lp[s]) for s in subsets]) for lp, _ in finals]

    name = {1: "mean single member", 3: "LoRA ens. (M=3, mean of 5 subsets of 6)"}
    name |= {5: "LoRA ens. (M=5, mean of 5 subsets of 6)", 6: "LoRA ens. (M=6)"}
    pairs = [(3, 1), (5, 1), (5, 3), (6, 1), (6, 5)]
    assert sorted((r["a"], r["b"], r["metric"]) for r in rows) == sorted(
        (name[m], name[v], metric) for m, v in pairs for metric in ("accuracy", "nll", "ece")
    )
    for row in rows:
        m, v = (next(k for k, n in name.items() if n == row[side]) for side in ("a", "b"))
        _check(row, _expected(model(m), model(v), y, row["metric"]), "0 1")


def test_without_per_epoch_log_probs_the_final_predictions_serve(tmp_path):
    for seed in (0, 1):
        write_train_run(tmp_path / "runs" / f"s{seed}", seed=seed, eval_log_probs=False)
    index = write_report([tmp_path / "runs"], tmp_path / "report")
    rows = read_csv(tmp_path / "report" / "differences.csv")
    assert {r["claim"] for r in rows} == {"ensemble − mean single member", SIZE}
    pools = [read_prediction_pool(tmp_path / "runs" / f"s{s}") for s in (0, 1)]
    y = pools[0].labels
    lps = [p.member_log_probs for p in pools]
    row = next(r for r in rows if r["metric"] == "nll")
    _check(row, _expected([_ensemble(lp) for lp in lps], lps, y, "nll"), "0 1")
    assert "over-confidence over training needs the reference" in index.read_text()


def test_without_a_reference_the_section_says_what_it_needs(tmp_path):
    write_train_run(tmp_path / "runs" / "kl", kl_beta=0.1)
    index = write_report([tmp_path / "runs"], tmp_path / "report")
    assert "arce: needs an unregularised LoRA run (method lora, no dropout)." in index.read_text()
    assert read_csv(tmp_path / "report" / "differences.csv") == []
