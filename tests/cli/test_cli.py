"""End to end through the command line, on a tiny random model and small question files."""

import json
import subprocess
import sys

import pytest
import yaml
from helpers import train_argv
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraens.cli.main import main
from loraens.rundir import read_jsonl

FP32 = ("--runtime.precision", "fp32")


@pytest.fixture
def trained_run(tiny_model_dir, questions_files, tmp_path):
    train, evaluation = questions_files
    out = tmp_path / "run"
    # fp32, so that re-scoring in fp32 must reproduce the training run's numbers exactly
    main(train_argv(tiny_model_dir, train, evaluation, out, *FP32))
    return out


def test_train_writes_a_complete_run_directory(trained_run):
    assert (trained_run / "config.yaml").exists()
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert config["ensemble"]["members"] == 3 and config["optim"]["batch_size"] == 8

    rows = read_jsonl(trained_run / "metrics.jsonl")
    evals = [r for r in rows if r["split"] == "eval"]
    # every epoch x (3 members + ensemble), each with the four metrics
    assert sorted({(r["epoch"], str(r["member"])) for r in evals}) == sorted(
        (e, m) for e in (1, 2) for m in ("0", "1", "2", "ensemble")
    )
    assert all({"accuracy", "nll", "ece", "brier"} <= set(r) for r in evals)
    assert len([r for r in rows if r["split"] == "train"]) == 2 * 3

    predictions = read_jsonl(trained_run / "predictions.jsonl")
    assert len(predictions) == 12
    first = predictions[0]
    assert len(first["member_probs"]) == 3
    assert sum(first["ensemble_probs"]) == pytest.approx(1, abs=1e-5)
    # the ensemble is the mean of the members' probabilities (Eq. 2)
    mean = [
        sum(p[k] for p in first["member_probs"]) / 3 for k in range(len(first["ensemble_probs"]))
    ]
    assert first["ensemble_probs"] == pytest.approx(mean, abs=1e-5)

    for m in range(3):
        folder = trained_run / "members" / f"member-{m:02d}"
        assert {p.name for p in folder.iterdir()} == {
            "adapter_config.json",
            "adapter_model.safetensors",
        }
    summary = json.loads((trained_run / "summary.json").read_text())
    assert "ensemble (M=3)" in summary["table"]


def test_train_prints_the_single_vs_ensemble_table(
    tiny_model_dir, questions_files, tmp_path, capsys
):
    train, evaluation = questions_files
    main(train_argv(tiny_model_dir, train, evaluation, tmp_path / "run", "--optim.epochs", "1"))
    out = capsys.readouterr().out
    assert "single (mean)" in out and "ensemble (M=3)" in out


def test_saved_member_loads_with_plain_peft(trained_run, tiny_model_dir):
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained_run / "members" / "member-01"
    )
    assert model.peft_config["default"].r == 8


def test_evaluate_and_predict_reproduce_the_training_run(trained_run, questions_files, tmp_path):
    train, evaluation = questions_files
    out = tmp_path / "eval.jsonl"
    main(
        [
            "evaluate",
            str(trained_run),
            "--file",
            str(evaluation),
            "--output",
            str(out),
            "--precision",
            "fp32",
        ]
    )
    rows = read_jsonl(out)
    final = [
        r
        for r in read_jsonl(trained_run / "metrics.jsonl")
        if r["split"] == "eval" and r["epoch"] == 2
    ]
    assert len(rows) == len(final) == 4  # 3 members + the ensemble
    for ours, theirs in zip(rows, final, strict=True):
        assert ours["member"] == theirs["member"]
        for metric in ("accuracy", "nll", "ece", "brier"):
            assert ours[metric] == pytest.approx(theirs[metric], rel=1e-6, abs=1e-9), metric

    unlabeled = tmp_path / "questions.jsonl"
    unlabeled.write_text(
        json.dumps({"question": "Which is red?", "choices": ["blue", "red", "gray"]}) + "\n"
    )
    predictions = tmp_path / "predictions.jsonl"
    main(["predict", str(trained_run), str(unlabeled), "--output", str(predictions)])
    (row,) = read_jsonl(predictions)
    assert row["letter"] in "abc" and 0 < row["probability"] <= 1
    assert 0 <= row["disagreement"] <= 1 and len(row["member_probs"]) == 3


def test_user_errors_are_one_paragraph_without_traceback(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "choices": ["only one"], "answer": 0}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(train_argv(tiny_model_dir, bad, bad, tmp_path / "run"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 1" in err and "choices" in err
    assert "Traceback" not in err

    with pytest.raises(SystemExit):
        main(["train", "--ensemble.members", "0"])
    assert "members" in capsys.readouterr().err


def test_rerun_of_a_finished_run_reports_it_and_a_changed_config_is_refused(
    trained_run, tiny_model_dir, questions_files, capsys
):
    train, evaluation = questions_files
    before = (trained_run / "metrics.jsonl").read_text()
    main(train_argv(tiny_model_dir, train, evaluation, trained_run, *FP32))
    assert "ensemble (M=3)" in capsys.readouterr().out
    assert (trained_run / "metrics.jsonl").read_text() == before
    with pytest.raises(SystemExit):
        main(train_argv(tiny_model_dir, train, evaluation, trained_run, *FP32, "--optim.lr", "0.5"))
    err = capsys.readouterr().err
    assert "different configuration" in err and "optim.lr" in err


def test_refuses_a_non_run_directory(tiny_model_dir, questions_files, tmp_path, capsys):
    train, evaluation = questions_files
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(train_argv(tiny_model_dir, train, evaluation, tmp_path))
    assert "not a loraens run" in capsys.readouterr().err


def test_console_script_lists_tasks():
    result = subprocess.run(
        [sys.executable, "-m", "loraens.cli.main", "tasks"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "arce" in result.stdout and "2376" in result.stdout
