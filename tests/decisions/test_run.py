"""Calibration through a run directory, end to end on a tiny model: `train --data.calibrate`,
`calibrate`, `evaluate`, `predict --max_risk --coverage` and `ood`."""

import json

import numpy as np
import pytest
from helpers import train_argv
from scipy.special import log_softmax, logsumexp

from loraens.cli.main import main
from loraens.rundir import RunDir, read_jsonl

FP32 = ("--runtime.precision", "fp32")


@pytest.fixture
def calibrated_run(tiny_model_dir, questions_files, tmp_path):
    train, evaluation = questions_files
    out = tmp_path / "run"
    flags = ("--data.calibrate", "true", "--optim.holdout_fraction", "0.5", *FP32)
    main(train_argv(tiny_model_dir, train, evaluation, out, *flags))
    return out


def _scaled(lp, t):
    return log_softmax(np.where(np.isfinite(lp), lp / t, -np.inf), axis=-1)


def _nll(lp, y):
    return -np.mean(lp[np.arange(len(y)), y])


def test_training_writes_temperatures_and_the_ts_rows(calibrated_run):
    run = RunDir(calibrated_run)
    record = run.read_calibration()
    held = run.read_holdout_log_probs()
    assert record.questions == len(held.labels) == 12 and record.source == "training hold-out"
    assert len(record.member_temperatures) == 3
    summary = run.read_summary()
    assert summary.train_questions == 12  # the other half was held out
    # The summary's TS rows, recomputed here from the saved eval log-probs.
    evals = run.read_eval_log_probs()
    lp, y = evals.at(evals.epochs[-1]), np.asarray(evals.labels)
    singles = [_nll(_scaled(x, t), y) for x, t in zip(lp, record.member_temperatures, strict=True)]
    assert summary.table["single + TS"]["nll"] == pytest.approx(np.mean(singles))
    ens = logsumexp(lp, axis=0) - np.log(3)
    assert summary.table["ensemble + TS"]["nll"] == pytest.approx(
        _nll(_scaled(ens, record.ensemble_temperature), y)
    )
    # Fitting on the held-out questions cannot make their NLL worse.
    assert record.holdout_nll["ensemble + TS"] <= record.holdout_nll["ensemble"] + 1e-12
    assert record.holdout_nll["single + TS"] <= record.holdout_nll["single"] + 1e-12


def test_calibrate_refits_from_the_hold_out_or_a_file(calibrated_run, questions_files, capsys):
    before = RunDir(calibrated_run).read_calibration()
    main(["calibrate", str(calibrated_run)])
    assert RunDir(calibrated_run).read_calibration() == before
    assert "member temperatures" in capsys.readouterr().out
    _, evaluation = questions_files
    main(["calibrate", str(calibrated_run), "--file", str(evaluation), "--precision", "fp32"])
    record = RunDir(calibrated_run).read_calibration()
    assert record.source == str(evaluation) and record.questions == 12
    assert len(RunDir(calibrated_run).read_holdout_log_probs().labels) == 12
    main(["calibrate", str(calibrated_run)])  # a refit keeps naming where the questions came from
    assert RunDir(calibrated_run).read_calibration() == record


def test_predict_abstains_and_adds_conformal_sets(
    calibrated_run, questions_files, tmp_path, capsys
):
    _, evaluation = questions_files
    out = tmp_path / "answers.jsonl"
    main(
        [
            "predict", str(calibrated_run), str(evaluation), "--output", str(out),
            "--max_risk", "0.5", "--coverage", "0.8", "--precision", "fp32",
        ]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "expected coverage" in printed and "mean size" in printed
    rows = read_jsonl(out)
    questions = read_jsonl(evaluation)
    run = RunDir(calibrated_run)
    record = run.read_calibration()
    held = run.read_holdout_log_probs()
    hlp, hy = held.member_log_probs[-1], np.asarray(held.labels)
    # The sets, rebuilt here from the held-out log-probs: LAC with the ensemble's temperature.
    h_ens = _scaled(logsumexp(hlp, axis=0) - np.log(3), record.ensemble_temperature)
    scores = np.sort(1 - np.exp(h_ens[np.arange(len(hy)), hy]))
    rank = int(np.ceil((len(hy) + 1) * 0.8))
    q_hat = scores[rank - 1] if rank <= len(hy) else np.inf
    for row, q in zip(rows, questions, strict=True):
        assert isinstance(row["abstain"], bool)
        assert sum(row["calibrated_probs"]) == pytest.approx(1, abs=1e-5)
        expected = [k for k, p in enumerate(row["calibrated_probs"]) if 1 - p <= q_hat + 1e-6]
        assert row["prediction_set"]["letters"] == ["abcde"[k] for k in expected]
        assert row["prediction_set"]["texts"] == [q["choices"][k] for k in expected]


def test_decisions_need_held_out_questions(tiny_model_dir, questions_files, tmp_path, capsys):
    train, evaluation = questions_files
    out = tmp_path / "plain"
    main(train_argv(tiny_model_dir, train, evaluation, out, "--optim.epochs", "1"))
    assert not RunDir(out).calibration.exists()
    with pytest.raises(SystemExit):
        main(["predict", str(out), str(evaluation), "--coverage", "0.9"])
    assert "loraens calibrate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["calibrate", str(out)])
    assert "--data.calibrate true" in capsys.readouterr().err


def test_evaluate_and_ood_show_the_ts_rows(calibrated_run, questions_files, tmp_path, capsys):
    _, evaluation = questions_files
    main(["evaluate", str(calibrated_run), "--file", str(evaluation), "--precision", "fp32"])
    printed = capsys.readouterr().out
    assert "ensemble + TS" in printed and "aurc" in printed and "set_size" in printed
    ood_file = tmp_path / "ood.jsonl"
    ood_file.write_text(
        json.dumps({"question": "Which is 7?", "choices": ["x", "y", "z", "w"], "answer": 1}) + "\n"
    )
    result = tmp_path / "ood.json"
    main(["ood", str(calibrated_run), "--ood_file", str(ood_file), "--output", str(result)])
    figures = json.loads(result.read_text())
    assert {"single + TS", "ensemble + TS"} <= set(figures["ood"])
    assert "ensemble + TS" in capsys.readouterr().out
