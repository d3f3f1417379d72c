"""Users' own multiple-choice questions, read from JSONL, CSV or Parquet files.

Every record has these fields (other fields are ignored):

- ``question``: a non-empty string;
- ``choices``: a list of 2 to 10 distinct non-empty strings (compared with leading and trailing
  whitespace stripped). In CSV, a cell holding a JSON list, e.g. ``["red", "green", "blue"]``;
- ``answer``: the index of the correct choice (0-based) or its letter, ``a``..``j`` or ``A``..``J``.
  Optional when loading with ``require_answer=False`` (questions that are only predicted on);
- ``id``: optional string or integer; defaults to ``"<file stem>:<n>"``, where ``n`` is the line
  (JSONL), row (CSV, header = row 1) or 0-based row index (Parquet) of the record, the same number
  error messages use. Ids must be unique within a file.

A file with any invalid record is rejected as a whole: :class:`DataFileError` lists every problem
(where, which field, what is wrong and what was expected), so nothing is half-loaded.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from loraens.data.prompts import LETTERS
from loraens.data.records import MAX_CHOICES, MIN_CHOICES, Question

MAX_ERRORS_SHOWN = 20

# A record as read from a file, numbered as error messages number it: the record's fields, or the
# reason it could not be read at all (e.g. invalid JSON).
RawRecord = tuple[int, dict[str, Any] | str]


class DataFileError(ValueError):
    """A questions file that cannot be read or holds invalid records."""


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) are not records
            try:
                record = json.loads(line.rstrip("\r\n"))  # so columns point into the line
            except json.JSONDecodeError as error:
                problem = f"invalid JSON ({error.msg} at column {error.colno})"
                yield number, f"{problem}; expected one JSON object per line"
                continue
            if isinstance(record, dict):
                yield number, record
            else:
                yield number, f"expected a JSON object, got {_json_type(record)}"


def _read_csv(path: Path) -> Iterator[RawRecord]:
    # utf-8-sig: spreadsheet programs often write a byte-order mark before the header.
    with path.open(encoding="utf-8-sig", newline="") as source:
        rows = csv.reader(source)
        header = next(rows, None)
        if header is None:
            raise DataFileError(f"{path}: the file is empty; expected a header row")
        # csv.reader yields [] for a blank line; counting those keeps row numbers equal to line
        # numbers whenever no cell spans several lines.
        for number, cells in enumerate(rows, start=2):
            if not cells:
                continue
            if len(cells) > len(header):
                yield (
                    number,
                    f"{len(cells)} cells; expected at most {len(header)}, as in the header",
                )
                continue
            # Empty cells mean "not given", the only way CSV can leave out an optional field.
            record = {name: cell for name, cell in zip(header, cells, strict=False) if cell != ""}
            yield number, _decode_csv_cells(record)


def _decode_csv_cells(record: dict[str, Any]) -> dict[str, Any] | str:
    """Decode the CSV cells that are not plain text: ``choices`` (a JSON list) and ``answer``."""
    if "choices" in record:
        try:
            record["choices"] = json.loads(record["choices"])
        except json.JSONDecodeError as error:
            return (
                f"field 'choices': invalid JSON ({error.msg}); expected a JSON list of strings "
                'such as ["yes", "no"]'
            )
    if "answer" in record:
        try:
            record["answer"] = int(record["answer"])
        except ValueError:
            pass  # a letter, or invalid: validation says which
    return record


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataFileError(f"{path}: not a readable Parquet file ({error})") from error
    yield from enumerate(table.to_pylist())


# For each supported extension: the reader, what its record numbers are called, and how they count.
_FORMATS: dict[str, tuple[Callable[[Path], Iterator[RawRecord]], str, str]] = {
    ".jsonl": (_read_jsonl, "line", "line numbers start at 1"),
    ".csv": (_read_csv, "row", "rows are counted from 1 with the header as row 1"),
    ".parquet": (_read_parquet, "row index", "row indices start at 0"),
}


_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _check_question(record: dict[str, Any]) -> list[str]:
    question = record.get("question")
    if question is None:
        return ["field 'question': missing; expected a non-empty string"]
    if not isinstance(question, str):
        return [f"field 'question': expected a non-empty string, got {_json_type(question)}"]
    if not question.strip():
        return ["field 'question': empty; expected a non-empty string"]
    return []


def _check_choices(record: dict[str, Any]) -> list[str]:
    expected = f"expected a list of {MIN_CHOICES} to {MAX_CHOICES} non-empty strings"
    choices = record.get("choices")
    if choices is None:
        return [f"field 'choices': missing; {expected}"]
    if not isinstance(choices, list):
        return [f"field 'choices': {expected}, got {_json_type(choices)}"]
    if not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        count = f"{len(choices)} choice" + ("" if len(choices) == 1 else "s")
        return [f"field 'choices': {count}; {expected}"]
    problems = [
        f"field 'choices': choice {index} is {problem}; {expected}"
        for index, choice in enumerate(choices)
        if (problem := _choice_problem(choice))
    ]
    return problems or _check_distinct(choices)


def _check_distinct(choices: list[str]) -> list[str]:
    """A problem for every choice that repeats an earlier one.

    Two options with the same text cannot be told apart, by a reader of the lettered prompt or
    by answer-text scoring (which would score the same continuation twice), so the answer
    between them is arbitrary. Leading and trailing whitespace is ignored, as it is when a
    choice is judged empty: ``"red"`` and ``"red "`` are the same option to a reader. Case is
    not, since it can carry meaning (``"Co"`` and ``"CO"``).
    """
    first_index: dict[str, int] = {}
    problems = []
    for index, choice in enumerate(choices):
        text = choice.strip()
        if text not in first_index:
            first_index[text] = index
            continue
        first = first_index[text]
        problems.append(
            f"field 'choices': choice {index} ({choice!r}) repeats choice {first} "
            f"({choices[first]!r}); expected distinct choices"
        )
    return problems


def _choice_problem(choice: Any) -> str:
    if not isinstance(choice, str):
        return _json_type(choice)
    return "" if choice.strip() else "empty"


def parse_answer(record: dict[str, Any], require_answer: bool) -> tuple[int | None, list[str]]:
    """The answer index, or the problems with the answer field."""
    answer = record.get("answer")
    choices = record.get("choices")
    # Invalid choices are reported on their own; the answer is then only checked for its form.
    valid_count = isinstance(choices, list) and MIN_CHOICES <= len(choices) <= MAX_CHOICES
    n = len(choices) if valid_count and isinstance(choices, list) else MAX_CHOICES
    expected = f"expected an index 0..{n - 1} or a letter {LETTERS[0]}..{LETTERS[n - 1]}"
    if answer is None:
        if require_answer:
            return None, [f"field 'answer': missing; {expected}"]
        return None, []
    if isinstance(answer, str) and len(answer) == 1 and answer.lower() in LETTERS:
        index = LETTERS.index(answer.lower())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, float) and answer.is_integer():
        index = int(answer)  # pandas stores an integer column with gaps as floats
    else:
        return None, [f"field 'answer': got {answer!r}; {expected}"]
    if not 0 <= index < n:
        return None, [f"field 'answer': {answer!r} is out of range for {n} choices; {expected}"]
    return index, []


def _parse_id(record: dict[str, Any], default: str) -> tuple[str, list[str]]:
    record_id = record.get("id")
    if record_id is None:
        return default, []
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        return str(record_id), []
    if isinstance(record_id, str) and record_id.strip():
        return record_id, []
    return default, [f"field 'id': got {record_id!r}; expected a non-empty string or an integer"]


def _parse_record(
    record: dict[str, Any], default_id: str, require_answer: bool
) -> tuple[Question | None, list[str]]:
    """The record as a question, or every problem found in it."""
    record_id, problems = _parse_id(record, default_id)
    problems += _check_question(record) + _check_choices(record)
    answer, answer_problems = parse_answer(record, require_answer)
    problems += answer_problems
    if problems:
        return None, problems
    return Question(record_id, record["question"], tuple(record["choices"]), answer), []


def _supported_formats() -> str:
    *others, last = _FORMATS
    return f"{', '.join(others)} or {last}"


def _error_message(path: Path, note: str, errors: list[str]) -> str:
    shown = "\n".join(f"  {error}" for error in errors[:MAX_ERRORS_SHOWN])
    more = len(errors) - MAX_ERRORS_SHOWN
    tail = f"\n  ... and {more} more" if more > 0 else ""
    plural = "s" if len(errors) != 1 else ""
    return f"{path}: {len(errors)} problem{plural} ({note}):\n{shown}{tail}"


def load_questions_file(path: str | Path, *, require_answer: bool = True) -> list[Question]:
    """Read and validate every question in a ``.jsonl``, ``.csv`` or ``.parquet`` file.

    Raises :class:`DataFileError` for a missing, unreadable or unsupported file (or a
    directory), and for a file with any invalid record, listing all problems found.
    """
    path = Path(path)
    # Before the extension check: a folder rarely has one, and "unsupported file type ''"
    # would not say what is wrong.
    if path.is_dir():
        raise DataFileError(
            f"{path}: is a directory, not a question file; expected the path of a "
            f"{_supported_formats()} file"
        )
    if path.suffix.lower() not in _FORMATS:
        raise DataFileError(
            f"{path}: unsupported file type {path.suffix!r}; supported formats: "
            f"{', '.join(_FORMATS)}"
        )
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    if not path.is_file():
        # A named pipe or a device: Parquet needs to seek, and a pipe cannot be read again.
        raise DataFileError(f"{path}: not a regular file; expected a {_supported_formats()} file")
    reader, unit, note = _FORMATS[path.suffix.lower()]

    questions: list[Question] = []
    errors: list[str] = []
    first_seen: dict[str, str] = {}
    try:
        for number, record in reader(path):
            where = f"{unit} {number}"
            if isinstance(record, str):
                errors.append(f"{where}: {record}")
                continue
            question, problems = _parse_record(record, f"{path.stem}:{number}", require_answer)
            errors += [f"{where}: {problem}" for problem in problems]
            if question is None:
                continue
            if question.id in first_seen:
                errors.append(
                    f"{where}: field 'id': duplicate id {question.id!r} (first used at "
                    f"{first_seen[question.id]}); expected ids to be unique"
                )
                continue
            first_seen[question.id] = where
            questions.append(question)
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not UTF-8 text ({error})") from error
    except OSError as error:
        # E.g. no read permission: reported like every other unusable file, not as a traceback.
        raise DataFileError(f"{path}: cannot be read ({error.strerror or error})") from error
    if errors:
        raise DataFileError(_error_message(path, note, errors))
    if not questions:
        raise DataFileError(f"{path}: no questions found; expected at least one record")
    return questions


def write_questions_jsonl(questions: Iterable[Question], path: str | Path) -> None:
    """Write questions as JSONL in the format :func:`load_questions_file` reads."""
    with Path(path).open("w", encoding="utf-8") as out:
        for q in questions:
            record = {"id": q.id, "question": q.question, "choices": q.choices, "answer": q.answer}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
