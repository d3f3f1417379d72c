"""A posterior's folder (and a BLoB run) in the shift tables: its single members (Laplace-LoRA,
M = 1) and its mixture, each with and without temperature scaling, recomputed from its records,
and compared with the LoRA ensemble with and without its temperatures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp
from test_report import read_csv, write_train_run
from test_report_decisions import ENSEMBLE_T, MEMBER_T, _calibrate
from test_report_shift import IN_SET, N_IN, _write_records

from loraens.experiments.report import write_report
from loraens.rundir import RunDir


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "obqa"
    ref = write_train_run(root / "none" / "s0", task="obqa", epochs=2)
    _write_records(ref, 1)
    _calibrate(ref)
    for key, method in ((2, "laplace"), (3, "blob")):
        run = write_train_run(root / method / "s0", task="obqa", epochs=2)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "method": method}))
        _write_records(run, key)
        _calibrate(run)
    out = tmp_path_factory.mktemp("report")
    write_report([root.parent], out)
    return root, read_csv(out / "shift.csv"), read_csv(out / "shift_differences.csv")


def _nll(lp: np.ndarray, y: np.ndarray) -> float:
    return float(-lp[np.arange(len(y)), y].mean())


def _mixture(members: np.ndarray) -> np.ndarray:
    return logsumexp(members, axis=0) - np.log(len(members))


@pytest.mark.parametrize("method", ["laplace", "blob"])
def test_the_posterior_gives_its_members_and_its_mixture_with_and_without_ts(report, method):
    root, rows, _ = report
    record = RunDir(root / method / "s0").read_ood_log_probs("arcc")
    y = record.in_labels
    members = record.in_log_probs  # (M, N, K)
    mixture = _mixture(members)
    want = {
        f"{method} (M=1)": np.mean([_nll(m, y) for m in members]),
        f"{method} ens. (M=3)": _nll(mixture, y),
        f"{method} (M=1) + TS": np.mean(
            [_nll(log_softmax(m / t, axis=-1), y) for m, t in zip(members, MEMBER_T, strict=True)]
        ),
        f"{method} ens. (M=3) + TS": _nll(log_softmax(mixture / ENSEMBLE_T, axis=-1), y),
    }
    for model, value in want.items():
        (row,) = [
            r for r in rows if (r["eval_set"], r["model"], r["metric"]) == (IN_SET, model, "nll")
        ]
        assert float(row["value"]) == pytest.approx(value, rel=1e-9)
        assert int(row["questions"]) == N_IN


def test_the_mixture_is_compared_with_its_own_members_and_with_the_lora_ensemble(report):
    _, _, differences = report
    pairs = {(r["a"], r["b"]) for r in differences if r["metric"] == "nll"}
    assert ("laplace ens. (M=3)", "laplace (M=1)") in pairs
    assert ("laplace ens. (M=3) + TS", "laplace (M=1) + TS") in pairs
    assert ("LoRA ens. (M=3)", "laplace ens. (M=3)") in pairs


@pytest.mark.parametrize("model", ["laplace ens. (M=3)", "blob ens. (M=3) + TS", "blob (M=1)"])
def test_every_method_is_compared_with_the_temperature_scaled_lora_ensemble(report, model):
    root, _, differences = report
    (row,) = [
        r
        for r in differences
        if (r["eval_set"], r["a"], r["b"], r["metric"])
        == ("arcc", model, "LoRA ens. (M=3) + TS", "nll")
    ]
    assert row["claim"] == "method − reference ensemble + TS"
    mine = RunDir(root / model.split()[0] / "s0").read_ood_log_probs("arcc")
    theirs = RunDir(root / "none" / "s0").read_ood_log_probs("arcc")
    y = mine.ood_labels
    baseline = _nll(log_softmax(_mixture(theirs.ood_log_probs) / ENSEMBLE_T, axis=-1), y)
    if model == "blob (M=1)":
        value = np.mean([_nll(m, y) for m in mine.ood_log_probs])
    else:
        scale = ENSEMBLE_T if model.endswith("+ TS") else 1.0
        value = _nll(log_softmax(_mixture(mine.ood_log_probs) / scale, axis=-1), y)
    # the scaled ensemble is computed in float32
    assert float(row["difference"]) == pytest.approx(value - baseline, rel=1e-6)


def test_the_differences_table_compares_the_posterior_mixture_with_the_reference(
    tmp_path_factory,
):
    root = tmp_path_factory.mktemp("runs")
    ref = write_train_run(root / "none" / "s0", task="obqa", epochs=2)
    laplace = write_train_run(root / "laplace" / "s0", task="obqa", epochs=2, weight_decay=0.02)
    summary = json.loads((laplace / "summary.json").read_text())
    config = (ref / "config.yaml").read_text()
    (laplace / "summary.json").write_text(json.dumps({**summary, "method": "laplace"}))
    (laplace / "config.yaml").write_text(config)  # a posterior keeps its source's config
    out = tmp_path_factory.mktemp("report")
    _calibrate(ref)
    _calibrate(laplace)
    write_report([root], out)
    rows = read_csv(out / "differences.csv")
    (row,) = [
        r
        for r in rows
        if r["a"] == "laplace ens. (M=3)" and r["b"] == "LoRA ens. (M=3)" and r["metric"] == "nll"
    ]
    mine, theirs = (RunDir(p).read_eval_log_probs() for p in (laplace, ref))
    y = theirs.labels
    a = logsumexp(mine.member_log_probs[-1], axis=0) - np.log(3)
    b = logsumexp(theirs.member_log_probs[-1], axis=0) - np.log(3)
    assert float(row["difference"]) == pytest.approx(_nll(a, y) - _nll(b, y), rel=1e-9)
    # and against the reference ensemble with its temperatures, with and without its own
    (row,) = [
        r
        for r in rows
        if (r["a"], r["b"], r["metric"])
        == ("laplace ens. (M=3) + TS", "LoRA ens. (M=3) + TS", "nll")
    ]
    assert row["claim"] == "method − reference ensemble + TS"
    scaled = [log_softmax(lp / ENSEMBLE_T, axis=-1) for lp in (a, b)]
    assert float(row["difference"]) == pytest.approx(
        _nll(scaled[0], y) - _nll(scaled[1], y), rel=1e-6
    )
    # one member with its own temperature: the mean of its members' figures
    (row,) = [
        r
        for r in rows
        if (r["a"], r["b"], r["metric"]) == ("laplace (M=1) + TS", "LoRA ens. (M=3) + TS", "nll")
    ]
    members = mine.member_log_probs[-1]
    single = np.mean(
        [_nll(log_softmax(m / t, axis=-1), y) for m, t in zip(members, MEMBER_T, strict=True)]
    )
    assert float(row["difference"]) == pytest.approx(single - _nll(scaled[1], y), rel=1e-6)
