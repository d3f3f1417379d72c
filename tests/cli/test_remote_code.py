"""Every command that loads a run lets the model folder's code run only when its own command line
says so, never because the run's config.yaml does."""

from __future__ import annotations

import json

import pytest
from helpers import write_untrained_run

from loraens.cli.main import main
from loraens.rundir import load
from loraens.training import run as training_run


class _Loaded(Exception):
    """Stops a command once the model loader is called: the tests need its arguments only."""


@pytest.fixture
def loader_calls(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def spy(name_or_path, **kwargs):
        calls.append(kwargs)
        raise _Loaded

    monkeypatch.setattr(load, "load_base_model", spy)
    return calls


@pytest.fixture
def questions(tmp_path):
    """A labelled questions file; the commands stop before scoring it."""
    path = tmp_path / "questions.jsonl"
    rows = [{"question": f"Which is {w}?", "choices": [w, "gray", "pink"], "answer": 0}
            for w in ("red", "blue", "gold")]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def remote_code_run(tmp_path, tiny_model_dir, questions):
    return write_untrained_run(
        tmp_path / "run", tiny_model_dir, questions, questions, trust_remote_code=True
    )


def _commands(run, questions, tmp_path) -> dict[str, list[str]]:
    return {
        "evaluate": ["evaluate", run, "--file", questions],
        "predict": ["predict", run, questions, "--output", str(tmp_path / "answers.jsonl")],
        "calibrate": ["calibrate", run, "--file", questions],
        "ood": ["ood", run, "--ood_file", questions],
        "serve": ["serve", run],
    }


COMMANDS = ["evaluate", "predict", "calibrate", "ood", "serve"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_run_asking_for_remote_code_needs_the_flag(
    command, remote_code_run, questions, tmp_path, loader_calls, capsys
):
    if command == "serve":
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
    argv = _commands(str(remote_code_run.root), str(questions), tmp_path)[command]

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--trust_remote_code true" in err and str(remote_code_run.config) in err
    assert "Traceback" not in err
    assert loader_calls == []

    with pytest.raises(_Loaded):
        main([*argv, "--trust_remote_code", "true"])
    assert [call["trust_remote_code"] for call in loader_calls] == [True]


def test_resume_takes_remote_code_from_the_command_line_not_the_run(
    remote_code_run, monkeypatch, capsys
):
    # --resume takes every setting from the directory, which may be someone else's.
    resumed = []

    def spy_train(cfg, out):
        resumed.append(cfg)
        raise _Loaded

    monkeypatch.setattr(training_run, "train_ensemble", spy_train)
    argv = ["train", "--resume", str(remote_code_run.root)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--model.trust_remote_code true" in err and str(remote_code_run.config) in err
    assert resumed == []

    with pytest.raises(_Loaded):
        main([*argv, "--model.trust_remote_code", "true"])
    assert resumed[0].model.trust_remote_code
