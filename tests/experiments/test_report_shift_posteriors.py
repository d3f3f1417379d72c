"""A posterior's folder in the shift tables: its single members (Laplace-LoRA, M = 1) and its
mixture, each with and without temperature scaling, recomputed from its records."""

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
    laplace = write_train_run(root / "laplace" / "s0", task="obqa", epochs=2)
    summary = json.loads((laplace / "summary.json").read_text())
    (laplace / "summary.json").write_text(json.dumps({**summary, "method": "laplace"}))
    _write_records(laplace, 2)
    _calibrate(laplace)
    out = tmp_path_factory.mktemp("report")
    write_report([root.parent], out)
    return laplace, read_csv(out / "shift.csv"), read_csv(out / "shift_differences.csv")


def _nll(lp: np.ndarray, y: np.ndarray) -> float:
    return float(-lp[np.arange(len(y)), y].mean())


def test_the_posterior_gives_its_members_and_its_mixture_with_and_without_ts(report):
    laplace, rows, _ = report
    record = RunDir(laplace).read_ood_log_probs("arcc")
    y = record.in_labels
    members = record.in_log_probs  # (M, N, K)
    mixture = logsumexp(members, axis=0) - np.log(len(members))
    want = {
        "laplace (M=1)": np.mean([_nll(m, y) for m in members]),
        "laplace ens. (M=3)": _nll(mixture, y),
        "laplace (M=1) + TS": np.mean(
            [_nll(log_softmax(m / t, axis=-1), y) for m, t in zip(members, MEMBER_T, strict=True)]
        ),
        "laplace ens. (M=3) + TS": _nll(log_softmax(mixture / ENSEMBLE_T, axis=-1), y),
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
