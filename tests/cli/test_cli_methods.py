"""The paper's other methods and evaluations, end to end through the command line."""

import json

import numpy as np
import pytest
from helpers import make_questions, train_argv

from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl
from loraens.evaluation.ood import SCORES
from loraens.rundir import RunDir, read_jsonl


def _train(model_dir, files, out, *extra):
    main(train_argv(model_dir, *files, out, *extra, lr=1e-2))


@pytest.mark.parametrize(
    "method, extra, saved",
    [
        ("mc_dropout", ["--lora.dropout", "0.2"], ["adapter_model.safetensors"]),
        ("last_layer", [], ["last_layer.safetensors"]),
        (
            "last_layer",
            ["--model.scoring", "answer_text", "--optim.loss", "option_nll"],
            ["last_layer.safetensors"],
        ),
        (
            "lora",
            ["--optim.kl_beta", "0.1", "--optim.weight_decay", "100", "--optim.decay_target", "B"],
            ["adapter_model.safetensors"],
        ),
    ],
)
def test_methods_write_the_same_run_directory(
    method, extra, saved, tiny_model_dir, questions_files, tmp_path
):
    out = tmp_path / method
    _train(tiny_model_dir, questions_files, out, "--ensemble.method", method, *extra)
    members = sorted((out / "members").iterdir())
    assert len(members) == (1 if method == "mc_dropout" else 3)
    assert all((m / saved[0]).exists() for m in members)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "eval"]
    assert {r["member"] for r in rows if r["epoch"] == 2} == {0, 1, 2, "ensemble"}
    # Every evaluated epoch's unrounded log-probs: each member's accuracy in metrics.jsonl,
    # and the final epoch's probabilities in predictions.jsonl, come from them.
    saved = RunDir(out).read_eval_log_probs()
    assert saved.epochs == [1, 2] and saved.member_log_probs.shape[:2] == (2, 3)
    for e, lp in zip(saved.epochs, saved.member_log_probs, strict=True):
        for r in rows:
            if r["epoch"] == e and r["member"] != "ensemble":
                hits = lp[r["member"]].argmax(axis=1) == saved.labels
                assert r["accuracy"] == pytest.approx(hits.mean(), abs=1e-12)
    for i, p in enumerate(read_jsonl(out / "predictions.jsonl")):
        k = len(p["member_probs"][0])
        last = np.exp(saved.member_log_probs[-1][:, i])
        np.testing.assert_allclose(last[:, :k], p["member_probs"], atol=1e-6)
        assert not last[:, k:].any()  # padding past the options is -inf
    prediction = read_jsonl(out / "predictions.jsonl")[0]
    assert len(prediction["member_probs"]) == 3  # M passes / members averaged
    assert json.loads((out / "summary.json").read_text())["epochs_trained"] == 2
    assert json.loads((out / "summary.json").read_text())["method"] == method
    if method == "mc_dropout":  # evaluate replays the M stochastic passes
        main(
            [
                "evaluate",
                str(out),
                "--file",
                str(questions_files[1]),
                "--output",
                str(tmp_path / "eval.jsonl"),
            ]
        )
        assert len(read_jsonl(tmp_path / "eval.jsonl")) == 4


def test_ood_and_size_ablation_commands(tiny_model_dir, questions_files, tmp_path, capsys):
    out = tmp_path / "run"
    _train(tiny_model_dir, questions_files, out)
    ood_file = tmp_path / "ood.jsonl"
    write_questions_jsonl(make_questions(10, seed=9, n_choices=4), ood_file)
    report = tmp_path / "ood.json"
    main(["ood", str(out), "--ood_file", str(ood_file), "--output", str(report)])
    result = json.loads(report.read_text())
    assert set(result["auroc"]["ensemble"]) == set(SCORES)
    assert "AUROC" in capsys.readouterr().out

    main(["ablate_size", str(out), "--sizes", "[1, 2, 3]", "--draws", "3"])
    printed = capsys.readouterr().out.splitlines()
    # (epoch, M) of each line: both evaluated epochs, from eval_log_probs.safetensors.
    assert [tuple(line.split()[:2]) for line in printed[1:]] == [
        (e, m) for e in ("1", "2") for m in ("1", "2", "3")
    ]


def test_few_shot_command(tiny_model_dir, tmp_path, capsys):
    report = tmp_path / "few.json"
    main(
        [
            "few_shot",
            "--task",
            "arce",
            "--model",
            str(tiny_model_dir),
            "--eval_limit",
            "4",
            "--draws",
            "2",
            "--output",
            str(report),
        ]
    )
    result = json.loads(report.read_text())
    assert result["k"] == 3 and len(result["per_draw"]) == 2
    assert "3-shot arce" in capsys.readouterr().out


def test_kl_and_decay_options_reach_the_training_loss(tiny_model_dir, questions_files, tmp_path):
    def final_train_loss(name, *extra):
        _train(tiny_model_dir, questions_files, tmp_path / name, *extra)
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        return [r["loss"] for r in rows if r["split"] == "train" and r["epoch"] == 2]

    plain = final_train_loss("plain")
    # the KL term is part of the reported training loss, so it must change it
    assert final_train_loss("kl", "--optim.kl_beta", "10") != pytest.approx(plain, rel=1e-4)
    assert final_train_loss(
        "decay", "--optim.weight_decay", "100", "--optim.decay_target", "B"
    ) != pytest.approx(plain, rel=1e-4)


def test_ood_set_is_scored_every_epoch_without_changing_training(
    tiny_model_dir, questions_files, tmp_path
):
    ood_file = tmp_path / "ood.jsonl"
    write_questions_jsonl(make_questions(7, seed=9, n_choices=4), ood_file)
    _train(tiny_model_dir, questions_files, tmp_path / "plain")
    _train(tiny_model_dir, questions_files, tmp_path / "ood", "--data.ood_file", str(ood_file))

    rows = read_jsonl(tmp_path / "ood" / "metrics.jsonl")
    for epoch in (1, 2):
        ood = {r["member"] for r in rows if r["split"] == "ood" and r["epoch"] == epoch}
        assert ood == {0, 1, 2, "ensemble"}
        detection = [r for r in rows if r["split"] == "ood_detection" and r["epoch"] == epoch]
        ensemble = next(r for r in detection if r["member"] == "ensemble")
        assert set(ensemble) >= {"neg_max_prob", "entropy", "mutual_information"}
        assert all(0.0 <= r["neg_max_prob"] <= 1.0 for r in detection)
    # Scoring the OOD set draws no randomness: training and eval rows are unchanged.
    plain = read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    assert [r for r in rows if r["split"] in ("train", "eval")] == plain
