"""Multiple-choice questions: the paper's built-in tasks and users' own files."""

from loraens.data.files import DataFileError, load_questions_file, write_questions_jsonl
from loraens.data.records import Question
from loraens.data.tasks import TASKS, TaskSpec, load_task, split_sizes

__all__ = [
    "TASKS",
    "DataFileError",
    "Question",
    "TaskSpec",
    "load_questions_file",
    "load_task",
    "split_sizes",
    "write_questions_jsonl",
]
