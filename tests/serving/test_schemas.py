"""The request schema takes a line of a questions file as it is: the same answers accepted, the
same ones refused with the same words, and unknown fields still refused. No server, no model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from loraens.data.files import DataFileError, load_questions_file
from loraens.serving.schemas import PredictRequest, QuestionIn

CHOICES = ["red", "green", "blue"]


def _from_file(tmp_path: Path, record: dict[str, Any]) -> int | None:
    """The answer `loraens predict` reads from a one-line JSONL file holding ``record``."""
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return load_questions_file(path, require_answer=False)[0].answer


@pytest.mark.parametrize(("answer", "index"), [(0, 0), (2, 2), ("b", 1), ("C", 2), (1.0, 1)])
def test_an_answer_a_file_accepts_is_accepted_as_the_same_index(tmp_path, answer, index):
    record = {"id": "q", "question": "Which is blue?", "choices": CHOICES, "answer": answer}
    assert QuestionIn.model_validate(record).answer == index == _from_file(tmp_path, record)


def test_no_answer_or_null_is_an_unlabelled_question(tmp_path):
    record = {"question": "Which is blue?", "choices": CHOICES}
    assert QuestionIn.model_validate(record).answer is None
    assert QuestionIn.model_validate({**record, "answer": None}).answer is None
    assert _from_file(tmp_path, {**record, "answer": None}) is None


@pytest.mark.parametrize("answer", [3, -1, "d", "z", "1", "", True, 1.5, [1], {"i": 1}])
def test_an_answer_a_file_refuses_is_refused_with_the_files_words(tmp_path, answer):
    record = {"question": "Which is blue?", "choices": CHOICES, "answer": answer}
    with pytest.raises(ValidationError) as caught:
        QuestionIn.model_validate(record)
    [error] = caught.value.errors()
    assert error["loc"] == ("answer",)
    assert "expected an index 0..2 or a letter a..c" in error["msg"]
    with pytest.raises(DataFileError) as file_error:
        _from_file(tmp_path, record)
    # the message after pydantic's "Value error, " is the file reader's, word for word
    assert error["msg"].removeprefix("Value error, ") in str(file_error.value)


def test_the_range_is_the_questions_own_number_of_choices():
    five = {"question": "q?", "choices": ["a", "b", "c", "d", "e"], "answer": "e"}
    assert QuestionIn.model_validate(five).answer == 4
    with pytest.raises(ValidationError, match="'e' is out of range for 2 choices"):
        QuestionIn.model_validate({**five, "choices": ["a", "b"]})


@pytest.mark.parametrize("field", ["source", "label", "answers"])
def test_an_unknown_field_is_still_refused(field):
    record = {"question": "q?", "choices": ["a", "b"], "answer": 0, field: 1}
    with pytest.raises(ValidationError) as caught:
        PredictRequest.model_validate({"questions": [record]})
    [error] = caught.value.errors()
    assert error["type"] == "extra_forbidden" and error["loc"] == ("questions", 0, field)
