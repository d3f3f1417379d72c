"""The report's decision sections (risk–coverage, TS, conformal sets; OOD under shift), drawn
from the files of synthetic run directories and checked against computations written here."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp
from test_report import synthetic_log_probs, write_train_run

from loraens.experiments.report import write_report
from loraens.io import write_json_atomic
from loraens.rundir import RunDir

MEMBER_T = [1.3, 0.8, 2.0]
ENSEMBLE_T = 1.7


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _calibrate(path: Path, n_holdout: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Held-out log-probs and a calibration record, as training with data.calibrate writes."""
    rng = np.random.default_rng(3)
    labels = rng.integers(4, size=n_holdout)
    lp = synthetic_log_probs(labels, 3, 1.0, rng)
    run = RunDir(path)
    run.write_holdout_log_probs(2, lp, labels)
    write_json_atomic(
        run.calibration,
        {
            "member_temperatures": MEMBER_T,
            "ensemble_temperature": ENSEMBLE_T,
            "questions": n_holdout,
            "source": "training hold-out",
        },
    )
    return lp, labels


def _scaled(lp, t):
    return log_softmax(lp / t, axis=-1)


@pytest.fixture(scope="module")
def decisions_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run = write_train_run(root / "obqa" / "fixed", task="obqa", epochs=2)
    held = _calibrate(run)
    write_json_atomic(
        RunDir(run).ood_result("arcc"),
        {
            "ood_set": "arcc",
            "ood": {
                "single (mean)": {"accuracy": 0.4, "nll": 1.3, "ece": 0.2, "brier": 0.7},
                "single (std)": {"accuracy": 0.01, "nll": 0.1, "ece": 0.01, "brier": 0.01},
                "ensemble (M=3)": {"accuracy": 0.45, "nll": 1.2, "ece": 0.1, "brier": 0.6},
                "ensemble + TS": {"accuracy": 0.45, "nll": 1.1, "ece": 0.05, "brier": 0.6},
            },
            "auroc": {
                "ensemble": {"neg_max_prob": 0.61},
                "single (mean)": {"neg_max_prob": 0.58},
                "ensemble + TS": {"neg_max_prob": 0.62},
            },
        },
    )
    out = tmp_path_factory.mktemp("report")
    return run, held, write_report([root], out)


def test_risk_coverage_figure_and_decision_table_come_from_the_run_files(decisions_report):
    run, (hlp, hy), index = decisions_report
    page = index.read_text()
    assert '<img src="fig-risk-coverage.png"' in page
    assert (index.parent / "fig-risk-coverage.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["model"]: r for r in _read_csv(index.parent / "decisions.csv")}
    assert set(rows) == {"single", "ensemble", "single + TS", "ensemble + TS"}

    evals = RunDir(run).read_eval_log_probs()
    lp, y = evals.at(2), np.asarray(evals.labels)
    ens = logsumexp(lp, axis=0) - np.log(3)
    ens_ts = _scaled(ens, ENSEMBLE_T)
    nll = -np.mean(ens_ts[np.arange(len(y)), y])
    assert float(rows["ensemble + TS"]["nll"]) == pytest.approx(nll)
    singles = [_scaled(x, t) for x, t in zip(lp, MEMBER_T, strict=True)]
    single_nll = np.mean([-np.mean(s[np.arange(len(y)), y]) for s in singles])
    assert float(rows["single + TS"]["nll"]) == pytest.approx(single_nll)
    # TS never changes the answer
    assert rows["ensemble + TS"]["accuracy"] == rows["ensemble"]["accuracy"]

    # AURC of the ensemble: mean error rate of the k most confident answers (no ties here)
    conf = np.exp(ens.max(axis=1))
    right = ens.argmax(axis=1) == y
    order = np.argsort(-conf)
    aurc = np.mean([1 - right[order[:k]].mean() for k in range(1, len(y) + 1)])
    assert float(rows["ensemble"]["aurc"]) == pytest.approx(aurc)

    # Conformal (LAC, 90%) sets of the ensemble + TS, calibrated on the held-out questions
    h_ens = _scaled(logsumexp(hlp, axis=0) - np.log(3), ENSEMBLE_T)
    scores = np.sort(1 - np.exp(h_ens[np.arange(len(hy)), hy]))
    q_hat = scores[int(np.ceil((len(hy) + 1) * 0.9)) - 1]
    sets = 1 - np.exp(ens_ts) <= q_hat
    assert float(rows["ensemble + TS"]["set_coverage"]) == pytest.approx(
        sets[np.arange(len(y)), y].mean()
    )
    assert float(rows["ensemble + TS"]["set_size"]) == pytest.approx(sets.sum(axis=1).mean())


def test_ood_table_lists_every_model_with_its_auroc(decisions_report):
    _, _, index = decisions_report
    rows = _read_csv(index.parent / "ood_decisions.csv")
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"single (mean)", "ensemble (M=3)", "ensemble + TS"}
    assert all(r["ood_set"] == "arcc" for r in rows)
    assert by_model["ensemble (M=3)"]["auroc"] == "0.61"
    assert by_model["ensemble + TS"]["auroc"] == "0.62"
    assert by_model["single (mean)"]["auroc"] == "0.58"


def test_an_uncalibrated_run_says_what_the_section_needs(tmp_path):
    write_train_run(tmp_path / "runs" / "plain", epochs=2)
    page = write_report([tmp_path / "runs"], tmp_path / "report").read_text()
    assert "trained with data.calibrate" in page
    assert not (tmp_path / "report" / "fig-risk-coverage.png").exists()


def test_the_report_with_its_decision_sections_loads_without_torch():
    code = "import sys, loraens.experiments.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
