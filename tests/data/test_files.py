"""Reading users' question files: round trips per format and one test per validation rule."""

import csv
import errno
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraens.data import DataFileError, Question, load_questions_file, write_questions_jsonl

QUESTIONS = [
    Question("q1", "What colour is the sky?", ("blue", "green", "red"), 0),
    Question("q2", 'Quotes "and", commas\nand newlines?', ("yes, really", 'a "b"'), 1),
    Question("q3", "Ünïcødé ✓", tuple(f"option {i}" for i in range(10)), 9),
]
VALID = {"question": "Is this valid?", "choices": ["yes", "no"], "answer": 0}


def write_jsonl(path, records):
    """Records are dicts (written as JSON) or strings (written verbatim as one line)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_csv(path, header, rows):
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def rejection(path, **kwargs) -> str:
    with pytest.raises(DataFileError) as info:
        load_questions_file(path, **kwargs)
    return str(info.value)


def assert_names(message, path, where, field):
    assert path.name in message
    assert f"{where}: field '{field}'" in message


# --- round trips ---------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "qs.jsonl"
    write_questions_jsonl(QUESTIONS, path)
    assert load_questions_file(path) == QUESTIONS
    assert load_questions_file(str(path)) == QUESTIONS


def test_jsonl_round_trip_without_answers(tmp_path):
    unlabeled = [Question(q.id, q.question, q.choices, None) for q in QUESTIONS]
    path = tmp_path / "qs.jsonl"
    write_questions_jsonl(unlabeled, path)
    assert load_questions_file(path, require_answer=False) == unlabeled
    assert_names(rejection(path), path, "line 1", "answer")


def test_csv_round_trip_with_json_list_choices(tmp_path):
    rows = [[q.id, q.question, json.dumps(q.choices), q.answer] for q in QUESTIONS]
    path = write_csv(tmp_path / "qs.csv", ["id", "question", "choices", "answer"], rows)
    assert load_questions_file(path) == QUESTIONS


def test_parquet_round_trip(tmp_path):
    records = [{**q.__dict__, "choices": list(q.choices)} for q in QUESTIONS]
    path = write_parquet(tmp_path / "qs.parquet", records)
    assert load_questions_file(path) == QUESTIONS


def test_default_ids_use_the_file_stem_and_the_reported_row_number(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [VALID, "", VALID])
    assert [q.id for q in load_questions_file(jsonl)] == ["a:1", "a:3"]
    rows = [[VALID["question"], json.dumps(VALID["choices"]), 0]] * 2
    csv_path = write_csv(tmp_path / "b.csv", ["question", "choices", "answer"], rows)
    assert [q.id for q in load_questions_file(csv_path)] == ["b:2", "b:3"]
    parquet = write_parquet(tmp_path / "c.parquet", [VALID, VALID])
    assert [q.id for q in load_questions_file(parquet)] == ["c:0", "c:1"]


def test_letters_are_accepted_in_either_case(tmp_path):
    records = [{**VALID, "choices": ["a", "b", "c"], "answer": letter} for letter in "bC"]
    path = write_jsonl(tmp_path / "l.jsonl", records)
    assert [q.answer for q in load_questions_file(path)] == [1, 2]
    rows = [["Which?", '["x", "y", "z", "w"]', letter] for letter in ("d", "A", "2")]
    path = write_csv(tmp_path / "l.csv", ["question", "choices", "answer"], rows)
    assert [q.answer for q in load_questions_file(path)] == [3, 0, 2]


def test_integer_ids_become_strings_and_extra_fields_are_ignored(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{**VALID, "id": 7, "source": "mine"}])
    assert load_questions_file(path) == [Question("7", VALID["question"], ("yes", "no"), 0)]


# --- one test per rule: the message names the file, the row and the field -------------------------

INVALID_RECORDS = {
    "missing question": ({"choices": ["a", "b"], "answer": 0}, "question", "missing"),
    "question not a string": ({**VALID, "question": 3}, "question", "got an integer"),
    "empty question": ({**VALID, "question": "  "}, "question", "empty"),
    "missing choices": ({"question": "Q?", "answer": 0}, "choices", "missing"),
    "choices not a list": ({**VALID, "choices": "a, b"}, "choices", "got a string"),
    "one choice": ({**VALID, "choices": ["a"]}, "choices", "1 choice;"),
    "eleven choices": ({**VALID, "choices": list("abcdefghijk")}, "choices", "11 choices"),
    "empty choice": ({**VALID, "choices": ["a", ""]}, "choices", "choice 1 is empty"),
    "choice not a string": ({**VALID, "choices": ["a", 2]}, "choices", "choice 1 is an integer"),
    "repeated choice": (
        {**VALID, "choices": ["a", "b", "a"]},
        "choices",
        "choice 2 ('a') repeats choice 0 ('a'); expected distinct choices",
    ),
    "choice repeated but for spaces": (
        {**VALID, "choices": ["red", "blue", " red "]},
        "choices",
        "choice 2 (' red ') repeats choice 0 ('red')",
    ),
    "missing answer": ({"question": "Q?", "choices": ["a", "b"]}, "answer", "missing"),
    "answer out of range": ({**VALID, "answer": 2}, "answer", "out of range"),
    "negative answer": ({**VALID, "answer": -1}, "answer", "out of range"),
    "letter out of range": ({**VALID, "answer": "c"}, "answer", "out of range"),
    "answer is choice text": ({**VALID, "answer": "yes"}, "answer", "got 'yes'"),
    "answer is a boolean": ({**VALID, "answer": True}, "answer", "got True"),
    "empty id": ({**VALID, "id": ""}, "id", "got ''"),
}


@pytest.mark.parametrize("case", INVALID_RECORDS)
def test_each_rule_names_file_row_and_field(tmp_path, case):
    record, field, problem = INVALID_RECORDS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [VALID, VALID, record])
    message = rejection(path)
    assert_names(message, path, "line 3", field)
    assert problem in message
    assert "expected" in message


def test_every_repeat_of_a_choice_is_reported(tmp_path):
    record = {**VALID, "choices": ["a", "b", "a", "b", "a"]}
    message = rejection(write_jsonl(tmp_path / "dup.jsonl", [record]))
    assert "3 problems" in message
    for repeat, first in [(2, 0), (3, 1), (4, 0)]:
        assert f"line 1: field 'choices': choice {repeat} " in message
        assert f"repeats choice {first} " in message


def test_repeated_choice_in_csv_names_the_row(tmp_path):
    rows = [["Fine?", '["yes", "no"]', "0"], ["Same?", '["yes", "yes"]', "0"]]
    path = write_csv(tmp_path / "dup.csv", ["question", "choices", "answer"], rows)
    message = rejection(path)
    assert_names(message, path, "row 3", "choices")
    assert "choice 1 ('yes') repeats choice 0 ('yes')" in message


def test_distinct_choices_load_even_when_they_differ_only_in_case_or_inner_spaces(tmp_path):
    # Case and inner spacing can carry meaning, so only a repeat after stripping is rejected.
    records = [{**VALID, "choices": ["Co", "CO", "C o", "co"]}, {**VALID, "id": "b"}]
    path = write_jsonl(tmp_path / "distinct.jsonl", records)
    questions = load_questions_file(path)
    assert [q.choices for q in questions] == [("Co", "CO", "C o", "co"), ("yes", "no")]


def test_duplicate_id_names_both_rows(tmp_path):
    records = [{**VALID, "id": "x"}, {**VALID, "id": "y"}, {**VALID, "id": "x"}]
    path = write_jsonl(tmp_path / "dup.jsonl", records)
    message = rejection(path)
    assert_names(message, path, "line 3", "id")
    assert "duplicate id 'x' (first used at line 1)" in message


def test_explicit_id_clashing_with_a_default_id_is_a_duplicate(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [VALID, {**VALID, "id": "d:1"}])
    assert_names(rejection(path), path, "line 2", "id")


def test_invalid_json_and_non_objects_name_the_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [VALID, '{"question": "Q?", ', "[1, 2]"])
    message = rejection(path)
    assert "broken.jsonl" in message
    assert (
        "line 2: invalid JSON (Expecting property name enclosed in double quotes at column"
        in message
    )
    assert "line 3: expected a JSON object, got a list" in message


def test_csv_rows_count_the_header_as_row_one(tmp_path):
    rows = [
        ["Fine?", '["yes", "no"]', "0"],
        ["Too few?", '["only"]', "0"],
        ["Bad JSON?", "[yes, no]", "0"],
        ["Cells?", '["a", "b"]', "0", "extra"],
        ["", '["a", "b"]', "0"],
    ]
    path = write_csv(tmp_path / "bad.csv", ["question", "choices", "answer"], rows)
    message = rejection(path)
    assert "header as row 1" in message
    assert_names(message, path, "row 3", "choices")
    assert_names(message, path, "row 4", "choices")
    assert "row 4: field 'choices': invalid JSON" in message
    assert "row 5: 4 cells; expected at most 3" in message
    assert_names(message, path, "row 6", "question")


def test_parquet_rows_are_named_by_zero_based_index(tmp_path):
    path = write_parquet(tmp_path / "bad.parquet", [VALID, {**VALID, "answer": 5}])
    message = rejection(path)
    assert "row indices start at 0" in message
    assert_names(message, path, "row index 1", "answer")


def test_all_problems_are_collected_before_raising(tmp_path):
    records = [
        {"choices": ["a", "b"]},  # two problems: no question, no answer
        VALID,
        {**VALID, "choices": ["a"]},
        "not json",
    ]
    path = write_jsonl(tmp_path / "many.jsonl", records)
    message = rejection(path)
    assert message.startswith(f"{path}: 4 problems")
    for where, field in [("line 1", "question"), ("line 1", "answer"), ("line 3", "choices")]:
        assert_names(message, path, where, field)
    assert "line 4: invalid JSON" in message


def test_long_error_lists_are_truncated(tmp_path):
    path = write_jsonl(tmp_path / "worse.jsonl", [{**VALID, "answer": 9}] * 25)
    message = rejection(path)
    assert "25 problems" in message
    assert "line 20: field 'answer'" in message
    assert "line 21" not in message
    assert message.endswith("... and 5 more")


# --- file-level problems -------------------------------------------------------------------------


def test_unknown_extension_lists_supported_formats(tmp_path):
    path = tmp_path / "qs.json"
    path.write_text("[]")
    message = rejection(path)
    assert "qs.json" in message
    assert all(ext in message for ext in (".jsonl", ".csv", ".parquet"))


def test_missing_file(tmp_path):
    assert "no such file" in rejection(tmp_path / "absent.jsonl")


@pytest.mark.parametrize("name", ["questions.jsonl", "questions.csv", "data.parquet", "data"])
def test_a_directory_is_named_as_one(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    message = rejection(path)
    assert message.startswith(f"{path}: is a directory, not a question file")
    assert ".jsonl, .csv or .parquet file" in message
    assert "no such file" not in message and "unsupported file type" not in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_a_named_pipe_is_not_a_regular_file(tmp_path):
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    message = rejection(path)
    assert message.startswith(f"{path}: not a regular file")
    assert "no such file" not in message


def test_an_unreadable_file_is_a_data_file_error(tmp_path, monkeypatch):
    # chmod cannot make a file unreadable to root (as in CI containers); fail the open instead.
    path = write_jsonl(tmp_path / "locked.jsonl", [VALID])

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    assert rejection(path) == f"{path}: cannot be read (Permission denied)"


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv"])
def test_empty_files_are_rejected(tmp_path, name):
    path = tmp_path / name
    path.write_text("")
    assert name in rejection(path)


def test_header_only_csv_has_no_questions(tmp_path):
    path = write_csv(tmp_path / "h.csv", ["question", "choices", "answer"], [])
    assert "no questions found" in rejection(path)


def test_undecodable_and_corrupt_files(tmp_path):
    text = tmp_path / "latin1.jsonl"
    text.write_bytes(json.dumps(VALID).replace("valid", "v\xe4lid").encode("latin-1"))
    assert "not UTF-8" in rejection(text)
    parquet = tmp_path / "corrupt.parquet"
    parquet.write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in rejection(parquet)
