"""Property tests: valid question lists round-trip, and one bad record anywhere is caught."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from loraens.data import DataFileError, Question, load_questions_file, write_questions_jsonl
from loraens.data.records import MAX_CHOICES, MIN_CHOICES

SETTINGS = settings(max_examples=50, deadline=None)

non_blank_text = st.text(min_size=1, max_size=40).filter(str.strip)


@st.composite
def questions(draw, require_answer=True):
    choices = draw(
        st.lists(non_blank_text, min_size=MIN_CHOICES, max_size=MAX_CHOICES, unique_by=str.strip)
    )
    answers = st.integers(0, len(choices) - 1)
    answer = draw(answers if require_answer else st.none() | answers)
    return Question(draw(non_blank_text), draw(non_blank_text), tuple(choices), answer)


def question_lists(require_answer=True):
    return st.lists(questions(require_answer), min_size=1, max_size=8, unique_by=lambda q: q.id)


def as_record(q: Question) -> dict:
    return {"id": q.id, "question": q.question, "choices": list(q.choices), "answer": q.answer}


@SETTINGS
@given(qs=question_lists(require_answer=False))
def test_jsonl_round_trip(tmp_path_factory, qs):
    path = tmp_path_factory.mktemp("jsonl") / "qs.jsonl"
    write_questions_jsonl(qs, path)
    assert load_questions_file(path, require_answer=False) == qs


@SETTINGS
@given(qs=question_lists())
def test_parquet_round_trip(tmp_path_factory, qs):
    path = tmp_path_factory.mktemp("parquet") / "qs.parquet"
    pq.write_table(pa.Table.from_pylist([as_record(q) for q in qs]), path)
    assert load_questions_file(path) == qs


INVALID_RECORDS = st.sampled_from(
    [
        ({"choices": ["a", "b"], "answer": 0}, "question"),
        ({"question": "Q?", "choices": ["a"], "answer": 0}, "choices"),
        ({"question": "Q?", "choices": list("abcdefghijk"), "answer": 0}, "choices"),
        ({"question": "Q?", "choices": ["a", "b", "a "], "answer": 0}, "choices"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": 2}, "answer"),
        ({"question": "Q?", "choices": ["a", "b"], "answer": "z"}, "answer"),
        ({"question": "", "choices": ["a", "b"], "answer": 0}, "question"),
    ]
)


@SETTINGS
@given(qs=question_lists(), bad=INVALID_RECORDS, data=st.data())
def test_one_invalid_record_anywhere_is_rejected_by_its_line(tmp_path_factory, qs, bad, data):
    record, field = bad
    position = data.draw(st.integers(0, len(qs)), label="position")
    records = [as_record(q) for q in qs]
    records.insert(position, {**record, "id": "the bad one"})
    path = tmp_path_factory.mktemp("bad") / "qs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    try:
        load_questions_file(path)
    except DataFileError as error:
        message = str(error)
    else:
        raise AssertionError("an invalid file was accepted")
    assert "qs.jsonl: 1 problem " in message
    assert f"line {position + 1}: field '{field}'" in message
