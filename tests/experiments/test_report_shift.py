"""The report's distribution-shift tables (shift.csv, shift_differences.csv) from synthetic OOD
records of two seeds: every number recomputed here, AUROCs with sklearn and every bootstrap
by a loop over the documented draws."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp
from scipy.stats import entropy
from sklearn.metrics import roc_auc_score
from test_report import N_CHOICES, read_csv, synthetic_log_probs, write_train_run
from test_report_decisions import ENSEMBLE_T, MEMBER_T, _calibrate
from test_report_differences import RESAMPLES, _check, _expected

from loraens.experiments.report import write_report
from loraens.io import write_json_atomic
from loraens.rundir import OODLogProbs, RunDir

N_IN, N_OUT = 30, 20
SETS = ("arcc", "mmlu-chem")
ENS, SINGLE = "LoRA ens. (M=3)", "mean single member"
IN_SET = "obqa (in distribution)"
MODELS = {
    SINGLE,
    "mean single member + TS",
    ENS,
    f"{ENS} + TS",
    "MC dropout 0.1 (M=3)",
    "last-layer ens. (M=3)",
}


def _labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(N_CHOICES, size=n)


def _write_records(run: Path, key: int, ood_ids_of: dict[str, list[str]] | None = None) -> None:
    """Records of both OOD sets: the in-distribution questions q0..q29, the OOD ones a0..a19
    (or ``ood_ids_of``), less sharp (shifted), one question of mmlu-chem with 3 options."""
    rng = np.random.default_rng(key)
    y_in = _labels(N_IN, 1)
    lp_in = synthetic_log_probs(y_in, 3, 1.5, rng)
    for i, name in enumerate(SETS):
        y_out = _labels(N_OUT, 2 + i)
        lp_out = synthetic_log_probs(y_out, 3, 0.4 + 0.6 * i, rng)
        if name == "mmlu-chem":
            y_out[0] = 1
            lp_out[:, 0, 3] = -np.inf
            lp_out[:, 0] = lp_out[:, 0] - logsumexp(lp_out[:, 0], axis=-1, keepdims=True)
        ids = (ood_ids_of or {}).get(name, [f"{name}-{j}" for j in range(N_OUT)])
        record = OODLogProbs(lp_in, y_in, [f"q{j}" for j in range(N_IN)], lp_out, y_out, ids)
        RunDir(run).write_ood_log_probs(name, record)
        write_json_atomic(RunDir(run).ood_result(name), {"ood_set": name})


@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "obqa"
    runs = {}
    for seed in (0, 1):
        for key, kwargs in (
            ("ref", {}),
            ("mc", {"method": "mc_dropout", "dropout": 0.1}),
            ("last", {"method": "last_layer"}),
        ):
            path = write_train_run(
                root / key / f"s{seed}", task="obqa", seed=seed, epochs=2, **kwargs
            )
            runs[key, seed] = path
            # Last-layer seed 1 scored other arcc questions: left out of arcc, kept elsewhere.
            other = (
                {"arcc": [f"x{j}" for j in range(N_OUT)]} if (key, seed) == ("last", 1) else None
            )
            _write_records(path, 10 * seed + len(runs), other)
    write_train_run(root / "plain" / "s0", task="arce")  # no records: the task gives no rows
    _calibrate(runs["ref", 0])  # temperature scaling on seed 0 only
    out = tmp_path_factory.mktemp("report")
    index = write_report([root.parent], out)
    return runs, read_csv(out / "shift.csv"), read_csv(out / "shift_differences.csv"), index


def _record(run: Path, name: str) -> OODLogProbs:
    return RunDir(run).read_ood_log_probs(name)


def _ensemble(lp: np.ndarray) -> np.ndarray:
    return logsumexp(lp, axis=0) - math.log(lp.shape[0])


def _ece(lp: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    conf, right = np.exp(lp.max(axis=1)), lp.argmax(axis=1) == y
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return sum(abs((right - conf)[which == b].sum()) for b in range(bins)) / len(y)


def _row(rows: list[dict], eval_set: str, model: str, metric: str) -> dict:
    (row,) = [
        r for r in rows if (r["eval_set"], r["model"], r["metric"]) == (eval_set, model, metric)
    ]
    return row


def test_every_set_and_model_has_its_metrics_and_aurocs(shift):
    _, rows, _, index = shift
    assert {r["eval_set"] for r in rows} == {IN_SET, *SETS}
    assert {r["task"] for r in rows} == {"obqa"}
    for eval_set in (IN_SET, *SETS):
        assert {r["model"] for r in rows if r["eval_set"] == eval_set} == MODELS
    aurocs = {
        (r["model"], r["metric"])
        for r in rows
        if r["eval_set"] == "arcc" and "auroc" in r["metric"]
    }
    assert ("LoRA ens. (M=3)", "auroc_mutual_information") in aurocs
    assert (SINGLE, "auroc_mutual_information") not in aurocs  # a single member has no MI
    assert (f"{ENS} + TS", "auroc_entropy") in aurocs
    assert not any(r["eval_set"] == IN_SET and "auroc" in r["metric"] for r in rows)
    # Last-layer seed 1 left arcc out, not the in-distribution questions (read from mmlu-chem).
    assert _row(rows, "arcc", "last-layer ens. (M=3)", "nll")["seeds"] == "0"
    assert _row(rows, IN_SET, "last-layer ens. (M=3)", "nll")["seeds"] == "0 1"
    assert "Distribution shift" in index.read_text()


def test_levels_are_the_mean_over_seeds_with_their_spread(shift):
    runs, rows, _, _ = shift
    records = [_record(runs["ref", s], "mmlu-chem") for s in (0, 1)]
    y = records[0].ood_labels
    nll = [-np.mean(_ensemble(r.ood_log_probs)[np.arange(N_OUT), y]) for r in records]
    row = _row(rows, "mmlu-chem", ENS, "nll")
    assert float(row["value"]) == pytest.approx(np.mean(nll), abs=1e-12)
    assert float(row["seed_min"]) == pytest.approx(min(nll), abs=1e-12)
    assert float(row["seed_sd"]) == pytest.approx(np.std(nll, ddof=1), abs=1e-12)
    assert (row["seeds"], row["questions"], row["low"]) == ("0 1", str(N_OUT), "")
    accuracy = [np.mean([(x.argmax(1) == y).mean() for x in r.ood_log_probs]) for r in records]
    assert float(_row(rows, "mmlu-chem", SINGLE, "accuracy")["value"]) == pytest.approx(
        np.mean(accuracy)
    )
    # + TS: seed 0 only, each member by its own temperature; in distribution as well.
    lp, y_in = records[0].in_log_probs, records[0].in_labels
    scaled = [log_softmax(x / t, axis=1) for x, t in zip(lp, MEMBER_T, strict=True)]
    row = _row(rows, IN_SET, "mean single member + TS", "ece")
    assert row["seeds"] == "0" and row["n_seeds"] == "1"
    assert float(row["value"]) == pytest.approx(np.mean([_ece(x, y_in) for x in scaled]), abs=1e-12)


def _draws() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, N_IN, (RESAMPLES, N_IN)), rng.integers(0, N_OUT, (RESAMPLES, N_OUT))


def _auroc(s_in: np.ndarray, s_out: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])


def _pairs_won(s_in: np.ndarray, s_out: np.ndarray) -> float:
    """The AUROC as the share of (in, OOD) pairs where the OOD score is higher, ties half
    (checked against sklearn on all questions; a loop over 2000 resamples needs it fast)."""
    return float(np.mean((s_out[None] > s_in[:, None]) + 0.5 * (s_out[None] == s_in[:, None])))


def _auroc_bootstrap(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(R,) the mean over seeds of the AUROC on every resample of both sets."""
    for a, b in pairs:
        assert _pairs_won(a, b) == pytest.approx(_auroc(a, b), abs=1e-12)
    idx_in, idx_out = _draws()
    return np.array(
        [
            np.mean([_pairs_won(a[i], b[o]) for a, b in pairs])
            for i, o in zip(idx_in, idx_out, strict=True)
        ]
    )


def _mi(lp: np.ndarray) -> np.ndarray:
    p = np.exp(lp)
    return np.round(np.maximum(entropy(p.mean(0), axis=1) - entropy(p, axis=2).mean(0), 0), 12)


def test_auroc_and_its_interval_resample_both_sets(shift):
    runs, rows, _, _ = shift
    records = [_record(runs["mc", s], "arcc") for s in (0, 1)]
    pairs = [(_mi(r.in_log_probs), _mi(r.ood_log_probs)) for r in records]
    row = _row(rows, "arcc", "MC dropout 0.1 (M=3)", "auroc_mutual_information")
    assert float(row["value"]) == pytest.approx(np.mean([_auroc(*p) for p in pairs]), abs=1e-12)
    low, high = np.percentile(_auroc_bootstrap(pairs), [2.5, 97.5])
    assert (float(row["low"]), float(row["high"])) == pytest.approx((low, high), abs=1e-12)
    assert (row["questions"], row["in_questions"], row["resamples"]) == ("20", "30", str(RESAMPLES))

    # The mean single member: each member's own -max p, its AUROC averaged over members.
    records = [_record(runs["ref", s], "arcc") for s in (0, 1)]
    per_seed = [
        np.mean(
            [
                _auroc(-np.exp(a.max(1)), -np.exp(b.max(1)))
                for a, b in zip(r.in_log_probs, r.ood_log_probs, strict=True)
            ]
        )
        for r in records
    ]
    row = _row(rows, "arcc", SINGLE, "auroc_neg_max_prob")
    assert float(row["value"]) == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert float(row["seed_max"]) == pytest.approx(max(per_seed), abs=1e-12)


def _diff(rows: list[dict], eval_set: str, claim: str, a: str, b: str) -> dict[str, dict]:
    chosen = {
        r["metric"]: r
        for r in rows
        if (r["eval_set"], r["claim"], r["a"], r["b"]) == (eval_set, claim, a, b)
    }
    assert chosen, (eval_set, claim, a, b)
    return chosen


def test_differences_are_paired_bootstraps_pooled_over_seeds(shift):
    runs, _, rows, _ = shift
    records = {s: _record(runs["ref", s], "arcc") for s in (0, 1)}
    y = records[0].ood_labels
    chosen = _diff(rows, "arcc", "ensemble − mean single member", ENS, SINGLE)
    assert set(chosen) == {"accuracy", "nll", "ece", "auroc_neg_max_prob", "auroc_entropy"}
    ens = [_ensemble(records[s].ood_log_probs) for s in (0, 1)]
    for metric in ("accuracy", "nll", "ece"):
        _check(
            chosen[metric],
            _expected(ens, [records[s].ood_log_probs for s in (0, 1)], y, metric),
            "0 1",
        )
    # AUROC: ensemble − mean member by -max p, both sets resampled with the same draws.
    idx_in, idx_out = _draws()
    per_seed, resampled = [], []
    for s in (0, 1):
        r = records[s]
        ens_scores = (
            -np.exp(_ensemble(r.in_log_probs).max(1)),
            -np.exp(_ensemble(r.ood_log_probs).max(1)),
        )
        members = [
            (-np.exp(a.max(1)), -np.exp(b.max(1)))
            for a, b in zip(r.in_log_probs, r.ood_log_probs, strict=True)
        ]

        def gap(i, o, e=ens_scores, m=members):
            return _pairs_won(e[0][i], e[1][o]) - np.mean([_pairs_won(a[i], b[o]) for a, b in m])

        per_seed.append(_auroc(*ens_scores) - np.mean([_auroc(a, b) for a, b in members]))
        resampled.append([gap(i, o) for i, o in zip(idx_in, idx_out, strict=True)])
    low, high = np.percentile(np.mean(resampled, axis=0), [2.5, 97.5])
    expected = {
        "per_seed": np.array(per_seed),
        "difference": np.mean(per_seed),
        "low": low,
        "high": high,
    }
    _check(chosen["auroc_neg_max_prob"], expected, "0 1")


def test_temperature_scaling_and_other_methods_pair_by_seed_and_questions(shift):
    runs, _, rows, index = shift
    # + TS − without, in distribution: seed 0 only (the only calibrated one).
    r0 = _record(runs["ref", 0], "arcc")
    y_in = r0.in_labels
    ens = _ensemble(r0.in_log_probs)
    chosen = _diff(rows, IN_SET, "temperature scaling: + TS − without", f"{ENS} + TS", ENS)
    assert set(chosen) == {"accuracy", "nll", "ece"}
    for metric, row in chosen.items():
        _check(row, _expected([log_softmax(ens / ENSEMBLE_T, axis=1)], [ens], y_in, metric), "0")
    # LoRA ensemble − last-layer: seed 1's last-layer run scored other arcc questions.
    chosen = _diff(rows, "arcc", "LoRA ensemble − method", ENS, "last-layer ens. (M=3)")
    ref = _ensemble(r0.ood_log_probs)
    last = _ensemble(_record(runs["last", 0], "arcc").ood_log_probs)
    _check(chosen["nll"], _expected([ref], [last], r0.ood_labels, "nll"), "0")
    assert (
        "arcc: last-layer ens. (M=3) seed 1 scored other questions; left out." in index.read_text()
    )
    # On mmlu-chem both seeds pair; the 3-option question stays in.
    chosen = _diff(rows, "mmlu-chem", "LoRA ensemble − method", ENS, "MC dropout 0.1 (M=3)")
    records = [
        (_record(runs["ref", s], "mmlu-chem"), _record(runs["mc", s], "mmlu-chem")) for s in (0, 1)
    ]
    y = records[0][0].ood_labels
    a = [_ensemble(r.ood_log_probs) for r, _ in records]
    b = [_ensemble(m.ood_log_probs) for _, m in records]
    _check(chosen["ece"], _expected(a, b, y, "ece"), "0 1")


def test_without_records_there_is_no_shift_csv_and_a_stale_one_goes(tmp_path, shift):
    write_train_run(tmp_path / "runs" / "none", task="obqa")
    out = tmp_path / "report"
    out.mkdir()
    (out / "shift.csv").write_text("stale\n")
    page = write_report([tmp_path / "runs"], out).read_text()
    assert not (out / "shift.csv").exists() and not (out / "shift_differences.csv").exists()
    assert "OOD records" in page
