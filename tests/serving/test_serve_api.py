"""A real `loraens serve` process on the tiny run, over HTTP: answers, info, bad input."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import numpy as np
import pytest
from helpers import log, make_questions

from loraens.cli.main import main
from loraens.data.files import load_questions_file, write_questions_jsonl
from loraens.data.prompts import LETTERS
from loraens.rundir import read_jsonl

FP32 = ("--device", "cpu", "--precision", "fp32")  # as the servers run (conftest.py)
LIMITS = ("--max_request_questions", "8", "--max_question_chars", "2000", "--max_wait_ms", "50")


@pytest.fixture(scope="module")
def server(start_server, served_run):
    return start_server(served_run, *LIMITS)


@pytest.fixture(scope="module")
def expected(served_run, tmp_path_factory):
    """`loraens predict` on the same questions (in this process, fp32): what the server must
    answer, whatever the batching."""
    questions = make_questions(8, seed=3)
    folder = tmp_path_factory.mktemp("predict")
    write_questions_jsonl(questions, folder / "questions.jsonl")
    out = folder / "predictions.jsonl"
    file = str(folder / "questions.jsonl")
    main(["predict", str(served_run), file, "--output", str(out), *FP32])
    return questions, {row["id"]: row for row in read_jsonl(out)}


def _payload(questions) -> dict:
    return {
        "questions": [{"id": q.id, "question": q.question, "choices": q.choices} for q in questions]
    }


def _assert_same_answer(ours: dict, theirs: dict) -> None:
    for key in ("id", "prediction", "letter", "text"):
        assert ours[key] == theirs[key], key
    for key in ("probability", "disagreement", "entropy", "mutual_information"):
        assert ours[key] == pytest.approx(theirs[key], abs=2e-5), key
    for key in ("ensemble_probs", "member_probs"):
        assert np.asarray(ours[key]) == pytest.approx(np.asarray(theirs[key]), abs=2e-5), key


def test_one_request_answers_like_predict_with_consistent_uncertainty(server, expected):
    questions, rows = expected
    with server.client() as client:
        response = client.post("/v1/predict", json=_payload(questions))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [a["id"] for a in body["answers"]] == [q.id for q in questions]
    for q, answer in zip(questions, body["answers"], strict=True):
        _assert_same_answer(answer, rows[q.id])
        members = np.asarray(answer["member_probs"])
        ensemble = np.asarray(answer["ensemble_probs"])
        assert members.shape == (3, len(q.choices))
        # recomputed here from the returned probabilities, independently of loraens
        assert ensemble == pytest.approx(members.mean(axis=0), abs=1e-5)
        assert answer["text"] == q.choices[int(ensemble.argmax())]
        entropy = -np.sum(ensemble * log(ensemble))
        member_entropy = -np.sum(members * log(members), axis=1).mean()
        assert answer["entropy"] == pytest.approx(entropy, abs=1e-4)
        assert answer["mutual_information"] == pytest.approx(entropy - member_entropy, abs=1e-4)
        assert answer["calibrated_probs"] is None and answer["prediction_set"] is None


def test_concurrent_requests_each_get_their_own_answers_equal_to_predict(server, expected):
    questions, rows = expected
    # one request per question and one with several, all in flight at once
    payloads = [_payload([q]) for q in questions] + [_payload(questions[2:7])]

    async def send_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/predict", json=p) for p in payloads))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * len(payloads)
    for payload, response in zip(payloads, responses, strict=True):
        answers = response.json()["answers"]
        assert [a["id"] for a in answers] == [q["id"] for q in payload["questions"]]
        for answer in answers:
            _assert_same_answer(answer, rows[answer["id"]])


def test_ids_default_to_the_position_in_the_request(server):
    question = {"question": "Which is red?", "choices": ["red", "blue"]}
    with server.client() as client:
        body = client.post("/v1/predict", json={"questions": [question, question]}).json()
    assert [a["id"] for a in body["answers"]] == ["0", "1"]
    assert body["answers"][0]["member_probs"] == body["answers"][1]["member_probs"]


def test_health_info_and_openapi(server, served_run, tiny_model_dir):
    with server.client() as client:
        assert client.get("/health").json()["status"] == "ok"
        info = client.get("/v1/info").json()
        schema = client.get("/openapi.json").json()
    assert info["model"] == str(tiny_model_dir) and info["members"] == 3
    assert info["method"] == "lora" and info["precision"] == "fp32"
    assert info["batching"]["max_request_questions"] == 8 and not info["batching"]["naive"]
    assert info["versions"]["torch"] and info["versions"]["fastapi"]
    provenance = json.loads((served_run / "provenance.json").read_text())
    assert info["provenance"]["model_sha256"] == provenance["model_sha256"]
    assert {"/v1/predict", "/v1/info", "/health"} <= set(schema["paths"])
    answer = schema["components"]["schemas"]["Answer"]["properties"]
    assert {"letter", "entropy", "mutual_information", "calibrated_probs"} <= set(answer)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"questions": [{"question": "q?"}]}, "choices"),
        ({"questions": [{"question": "q?", "choices": ["only one"]}]}, "choices"),
        ({"questions": [{"question": " ", "choices": ["a", "b"]}]}, "question"),
        ({"questions": [{"question": "q?", "choices": ["a", ""]}]}, "choices"),
        ({"questions": [{"question": "q?", "choices": "a, b"}]}, "choices"),
        ({"questions": []}, "questions"),
        ({"question": "q?", "choices": ["a", "b"]}, "questions"),
        ({"questions": [{"question": "q?", "choices": ["a", "b"], "source": "x"}]}, "source"),
        ({"questions": [{"question": "q?", "choices": ["a", "b"], "answer": 2}]}, "answer"),
        ({"questions": [{"question": "q?", "choices": ["a", "b"], "answer": "c"}]}, "answer"),
        ({"questions": [{"question": "q?", "choices": ["a", "b"], "answer": True}]}, "answer"),
    ],
)
def test_a_malformed_request_gets_422_naming_the_field_and_the_server_goes_on(server, body, field):
    with server.client() as client:
        response = client.post("/v1/predict", json=body)
        assert response.status_code == 422
        assert any(field in error["loc"] for error in response.json()["detail"])
        ok = client.post(
            "/v1/predict", json={"questions": [{"question": "q?", "choices": ["a", "b"]}]}
        )
        assert ok.status_code == 200


def test_a_body_that_is_not_json_gets_422(server):
    with server.client() as client:
        response = client.post(
            "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 422


def test_an_oversized_request_gets_413_saying_what_is_too_large(server):
    question = {"question": "Which is red?", "choices": ["red", "blue"]}
    with server.client() as client:
        too_many = client.post("/v1/predict", json={"questions": [question] * 9})
        too_long = client.post(
            "/v1/predict",
            json={"questions": [question, {"question": "x" * 2001, "choices": ["a", "b"]}]},
        )
        # within the character limit, but the choices alone exceed the run's 512 tokens
        # (the tiny tokenizer spends a token per character)
        long_choices = client.post(
            "/v1/predict", json={"questions": [{"question": "q?", "choices": ["y" * 600, "n"]}]}
        )
        after = client.post("/v1/predict", json={"questions": [question]})
    assert too_many.status_code == 413 and "9 questions" in too_many.json()["detail"]
    assert too_long.status_code == 413 and "questions.1" in too_long.json()["detail"]
    assert long_choices.status_code == 413 and "max_length" in long_choices.json()["detail"]
    assert after.status_code == 200


def test_a_line_of_a_questions_file_sent_as_is_answers_like_without_its_answer(
    server, expected, tmp_path
):
    questions, rows = expected
    file = tmp_path / "eval.jsonl"
    write_questions_jsonl(questions, file)  # the format `loraens predict` reads
    assert load_questions_file(file) == questions
    records = [json.loads(line) for line in file.read_text().splitlines()]
    assert all("answer" in record for record in records)
    with server.client() as client:
        labelled = client.post("/v1/predict", json={"questions": records})
        unlabelled = client.post("/v1/predict", json=_payload(questions))
    assert labelled.status_code == 200, labelled.text
    answers, plain = labelled.json()["answers"], unlabelled.json()["answers"]
    for q, answer, without in zip(questions, answers, plain, strict=True):
        _assert_same_answer(answer, without)
        _assert_same_answer(answer, rows[q.id])
        assert answer["answer"] == q.answer and answer["answer_letter"] == LETTERS[q.answer]
        top = int(np.argmax(answer["ensemble_probs"]))
        assert answer["correct"] is (top == q.answer)
        assert without["answer"] is None and without["correct"] is None


def test_correct_is_true_only_for_the_answer_that_is_the_ensembles_argmax(server):
    # The same question once per option, each copy claiming another option is right, in every
    # form a file allows: exactly one copy is correct, whatever the model predicts.
    choices = ["red", "blue", "green", "gold"]
    forms = [0, "b", "C", 3.0]
    asked = [{"question": "Which is gold?", "choices": choices, "answer": a} for a in forms]
    with server.client() as client:
        response = client.post("/v1/predict", json={"questions": asked})
    assert response.status_code == 200, response.text
    answers = response.json()["answers"]
    top = int(np.argmax(answers[0]["ensemble_probs"]))  # by hand, from the returned probs
    assert [a["answer"] for a in answers] == [0, 1, 2, 3]
    assert [a["answer_letter"] for a in answers] == ["a", "b", "c", "d"]
    assert [a["correct"] for a in answers] == [i == top for i in range(4)]
    assert {a["prediction"] for a in answers} == {top}


def test_an_out_of_range_answer_gets_422_saying_why(server):
    question = {"question": "Which is gold?", "choices": ["red", "blue", "gold"], "answer": 3}
    with server.client() as client:
        response = client.post("/v1/predict", json={"questions": [question]})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "questions", 0, "answer"]
    assert (
        "3 is out of range for 3 choices; expected an index 0..2 or a letter a..c" in (error["msg"])
    )


def test_ctrl_c_stops_the_server_cleanly(server):
    # last in this module: the server is not needed after it
    # 0, or 130 where uvicorn re-raises the interrupt after its shutdown (main's exit code)
    assert server.stop(signal.SIGINT) in (0, 130)
    assert "batcher drained" in server.log.read_text()
