"""`loraens train` / `evaluate` / `predict` end to end with answer-text scoring, tiny model."""

import json

import pytest
from helpers import train_argv

from loraens.cli.main import main
from loraens.rundir import read_jsonl

PRECISION = ("--precision", "fp32")


@pytest.mark.parametrize(
    "extra",
    [
        ("--optim.loss", "option_nll", "--optim.kl_beta", "0.05"),
        ("--ensemble.method", "mc_dropout", "--lora.dropout", "0.2"),
    ],
    ids=["lora-option-nll-kl", "mc-dropout-token-nll"],
)
def test_answer_text_run_is_reproduced_by_evaluate_and_predict(
    tiny_model_dir, questions_files, tmp_path, extra
):
    train, evaluation = questions_files
    run = tmp_path / "run"
    scoring = ("--model.scoring", "answer_text", "--model.normalization", "per_token")
    fp32 = ("--runtime.precision", "fp32")
    main(train_argv(tiny_model_dir, train, evaluation, run, *scoring, *fp32, *extra))
    out = tmp_path / "eval.jsonl"
    main(["evaluate", str(run), "--file", str(evaluation), "--output", str(out), *PRECISION])
    final = [
        r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "eval" and r["epoch"] == 2
    ]
    rows = read_jsonl(out)
    assert len(rows) == len(final) == 4  # 3 members (or passes) + the ensemble
    for ours, theirs in zip(rows, final, strict=True):
        if "mc_dropout" in extra:  # fresh dropout masks: the same kind of numbers, not equal
            assert ours["member"] == theirs["member"] and 0 <= ours["accuracy"] <= 1
            continue
        for metric in ("accuracy", "nll", "ece", "brier"):
            assert ours[metric] == pytest.approx(theirs[metric], rel=1e-6, abs=1e-9), metric
    unlabeled = tmp_path / "questions.jsonl"
    unlabeled.write_text(
        json.dumps({"question": "Which is red?", "choices": ["blue", "red", "gray"]}) + "\n"
    )
    predictions = tmp_path / "predictions.jsonl"
    main(["predict", str(run), str(unlabeled), "--output", str(predictions), *PRECISION])
    (row,) = read_jsonl(predictions)
    assert len(row["ensemble_probs"]) == 3
    assert sum(row["ensemble_probs"]) == pytest.approx(1.0, abs=1e-5)
