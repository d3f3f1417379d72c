"""A calibrated run behind `loraens serve`: temperature-scaled probabilities always, abstention
and conformal sets on request, each equal to what `loraens predict` decides."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_questions, train_argv

from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl
from loraens.rundir import RunDir, read_jsonl

FP32 = ("--device", "cpu", "--precision", "fp32")


@pytest.fixture(scope="module")
def calibrated_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    train, evaluation = root / "train.jsonl", root / "eval.jsonl"
    write_questions_jsonl(make_questions(16, seed=1), train)
    write_questions_jsonl(make_questions(8, seed=2), evaluation)
    out = root / "run"
    flags = ("--data.calibrate", "true", "--optim.holdout_fraction", "0.5")
    fp32 = ("--runtime.device", "cpu", "--runtime.precision", "fp32")
    main(train_argv(tiny_model_dir, train, evaluation, out, "--optim.epochs", "1", *flags, *fp32))
    return out


def test_answers_carry_the_decisions_predict_makes(
    calibrated_run, served_run, start_server, tmp_path
):
    questions = make_questions(8, seed=3)
    file = tmp_path / "ask.jsonl"
    write_questions_jsonl(questions, file)
    out = tmp_path / "predicted.jsonl"
    options = ("--max_risk", "0.7", "--coverage", "0.8", "--score", "aps")
    main(["predict", str(calibrated_run), str(file), "--output", str(out), *options, *FP32])
    expected = {row["id"]: row for row in read_jsonl(out)}

    payload = {
        "questions": [{"id": q.id, "question": q.question, "choices": q.choices} for q in questions]
    }
    server = start_server(calibrated_run)
    with server.client() as client:
        plain = client.post("/v1/predict", json=payload).json()["answers"]
        decided = client.post(
            "/v1/predict", json={**payload, "max_risk": 0.7, "coverage": 0.8, "score": "aps"}
        ).json()["answers"]
        info = client.get("/v1/info").json()

    record = RunDir(calibrated_run).read_calibration()
    assert record is not None
    assert info["calibration"]["ensemble_temperature"] == pytest.approx(record.ensemble_temperature)
    for answer in plain:
        # Temperature-scaled probabilities always; decisions only when asked for.
        assert answer["abstain"] is None and answer["prediction_set"] is None
        p = np.asarray(answer["ensemble_probs"])
        scaled = p ** (1 / record.ensemble_temperature)  # independent: softmax(log p / T)
        scaled /= scaled.sum()
        assert np.asarray(answer["calibrated_probs"]) == pytest.approx(scaled, abs=1e-3)
    for answer in decided:
        theirs = expected[answer["id"]]
        assert answer["abstain"] == theirs["abstain"]
        assert answer["prediction_set"] == theirs["prediction_set"]
        assert answer["calibrated_probs"] == pytest.approx(theirs["calibrated_probs"], abs=2e-5)
        assert answer["probability"] == pytest.approx(theirs["probability"], abs=2e-5)
    assert all(isinstance(a["abstain"], bool) for a in decided)

    # A run without held-out questions cannot choose a threshold: 422 naming the field.
    uncalibrated = start_server(served_run)
    with uncalibrated.client() as client:
        refused = client.post("/v1/predict", json={**payload, "coverage": 0.9})
        bad_score = client.post("/v1/predict", json={**payload, "score": "raps"})
    assert refused.status_code == 422 and refused.json()["detail"].startswith("coverage")
    assert bad_score.status_code == 422 and "score" in bad_score.text
