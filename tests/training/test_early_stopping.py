"""optim.patience: stop on held-out NLL and keep the best epoch's adapters."""

import json

from helpers import make_questions

from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl
from loraens.rundir import read_jsonl


def test_patience_stops_and_keeps_the_best_epoch(tiny_model_dir, tmp_path):
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_questions_jsonl(make_questions(40, seed=1), train)
    write_questions_jsonl(make_questions(12, seed=2), evaluation)
    out = tmp_path / "run"
    main(
        [
            "train",
            "--out",
            str(out),
            "--model.name_or_path",
            str(tiny_model_dir),
            "--data.task",
            "null",
            "--data.train_file",
            str(train),
            "--data.eval_file",
            str(evaluation),
            "--ensemble.members",
            "2",
            "--optim.epochs",
            "12",
            "--optim.lr",
            "0.1",
            "--optim.batch_size",
            "4",
            "--optim.patience",
            "2",
            "--optim.holdout_fraction",
            "0.25",
            "--runtime.progress",
            "false",
            "--runtime.precision",
            "fp32",
        ]
    )
    rows = read_jsonl(out / "metrics.jsonl")
    holdout = {
        r["epoch"]: r["nll"] for r in rows if r["split"] == "holdout" and r["member"] == "ensemble"
    }
    summary = json.loads((out / "summary.json").read_text())
    best = min(holdout, key=holdout.get)
    assert summary["epoch_kept"] == best
    assert summary["train_questions"] == 30  # 10 of 40 held out
    # lr 0.1 overfits 30 questions within a few epochs: the run stops after exactly
    # `patience` epochs without improvement, well before its 12
    assert summary["epochs_trained"] == best + 2 < 12
    # the saved members are the kept epoch's: re-scoring them reproduces that epoch's eval row
    kept = next(
        r for r in rows if r["split"] == "eval" and r["epoch"] == best and r["member"] == "ensemble"
    )
    main(
        [
            "evaluate",
            str(out),
            "--file",
            str(evaluation),
            "--precision",
            "fp32",
            "--output",
            str(tmp_path / "eval.jsonl"),
        ]
    )
    rescored = read_jsonl(tmp_path / "eval.jsonl")[-1]
    assert abs(rescored["nll"] - kept["nll"]) < 1e-4
    assert abs(summary["table"]["ensemble (M=2)"]["nll"] - rescored["nll"]) < 1e-4
