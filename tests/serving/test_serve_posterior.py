"""`loraens serve` on a posterior's folder answers as `predict` on it (Laplace's linearised
predictive needs gradients inside the server too)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_questions

from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl
from loraens.rundir import read_jsonl

FP32 = ("--device", "cpu", "--precision", "fp32")


@pytest.fixture(scope="module")
def posterior(served_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("posterior") / "laplace"
    # The served run holds no questions out: the prior precision comes from the evidence.
    main(["posterior", str(served_run), "--out", str(out), "--posterior.batch_size", "2", *FP32])
    return out


def test_serve_answers_a_laplace_posterior_like_predict(start_server, posterior, tmp_path):
    questions = make_questions(4, seed=9)
    write_questions_jsonl(questions, tmp_path / "q.jsonl")
    main(
        [
            "predict",
            str(posterior),
            str(tmp_path / "q.jsonl"),
            "--output",
            str(tmp_path / "p.jsonl"),
            *FP32,
        ]
    )
    expected = {row["id"]: row for row in read_jsonl(tmp_path / "p.jsonl")}
    server = start_server(posterior)
    payload = {
        "questions": [{"id": q.id, "question": q.question, "choices": q.choices} for q in questions]
    }
    with server.client() as client:
        response = client.post("/v1/predict", json=payload)
    assert response.status_code == 200, response.text
    for answer in response.json()["answers"]:
        want = expected[answer["id"]]
        assert answer["prediction"] == want["prediction"]
        np.testing.assert_allclose(answer["member_probs"], want["member_probs"], atol=2e-5)
