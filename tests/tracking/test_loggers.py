"""runtime.logger: what TensorBoard and MLflow hold after a run, read back with their own readers
and checked against the run's metrics.jsonl; a resumed run logs every epoch exactly once."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import make_questions, train_argv

import loraens.training.trainer as trainer_module
from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl
from loraens.rundir import read_jsonl
from loraens.tracking import epoch_metrics, open_tracker

EPOCHS = 3
MEMBERS = 2
FP32 = ("--runtime.precision", "fp32")


def _expected(run_dir) -> dict[str, dict[int, float]]:
    """{tag: {epoch: value}} straight from metrics.jsonl, built here without loraens."""
    tags: dict[str, dict[int, float]] = {}
    losses: dict[int, list[float]] = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        member = row["member"]
        who = member if member == "ensemble" else f"member-{member:02d}"
        for key, value in row.items():
            if key not in ("epoch", "split", "member"):
                tags.setdefault(f"{row['split']}/{who}/{key}", {})[row["epoch"]] = value
        if row["split"] == "train":
            losses.setdefault(row["epoch"], []).append(row["loss"])
    tags["train/mean/loss"] = {e: sum(v) / len(v) for e, v in losses.items()}
    return tags


def _train(
    tiny_model_dir, questions_files, out, *flags, interrupt_at_epoch=None, then=None, monkeypatch
):
    """`loraens train` for EPOCHS epochs; Ctrl-C at the start of ``interrupt_at_epoch`` (0-based)
    once, ``then()``, then the same command again, which resumes."""
    args = train_argv(
        tiny_model_dir, *questions_files, out, *FP32, *flags, members=MEMBERS, epochs=EPOCHS
    )
    if interrupt_at_epoch is not None:
        real = trainer_module.EnsembleTrainer.train_epoch

        def interrupted(self, epoch, *a, **k):
            if epoch == interrupt_at_epoch:
                raise KeyboardInterrupt
            return real(self, epoch, *a, **k)

        monkeypatch.setattr(trainer_module.EnsembleTrainer, "train_epoch", interrupted)
        with pytest.raises(SystemExit):
            main(args)
        monkeypatch.setattr(trainer_module.EnsembleTrainer, "train_epoch", real)
        if then is not None:
            then()
    main(args)


@pytest.fixture
def with_ood(questions_files, tmp_path):
    ood = tmp_path / "ood.jsonl"
    write_questions_jsonl(make_questions(8, seed=9, n_choices=4), ood)
    return ("--data.ood_file", str(ood))


def test_tensorboard_holds_every_epoch_once_across_a_resume(
    tiny_model_dir, questions_files, with_ood, tmp_path, monkeypatch, one_thread
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    flags = ("--runtime.logger", "tensorboard", *with_ood)

    def forget_epoch_2():
        # As if the process died after logging epoch 2 but before recording that it had.
        state = json.loads((out / "tracking.json").read_text())
        ((key, entry),) = state.items()
        assert entry["epochs_logged"] == 2
        entry["epochs_logged"] = 1
        (out / "tracking.json").write_text(json.dumps(state))

    _train(
        tiny_model_dir,
        questions_files,
        out,
        *flags,
        interrupt_at_epoch=2,
        then=forget_epoch_2,
        monkeypatch=monkeypatch,
    )

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    expected = _expected(out)
    assert {"eval/ensemble/nll", "eval/member-01/ece", "train/member-00/loss"} <= set(expected)
    assert {"ood/ensemble/accuracy", "ood_detection/ensemble/mutual_information"} <= set(expected)
    assert set(expected) <= set(scalars)
    for tag, by_epoch in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [step for step, _ in logged] == list(range(1, EPOCHS + 1)), tag  # each once
        assert [value for _, value in logged] == pytest.approx(
            [by_epoch[s] for s in range(1, EPOCHS + 1)], rel=1e-6
        ), tag
    summary_table = json.loads((out / "summary.json").read_text())["table"]
    ensemble_row = next(v for k, v in summary_table.items() if k.startswith("ensemble"))
    final = events.Scalars("final/ensemble/nll")
    assert [(e.step, e.value) for e in final] == [(EPOCHS, pytest.approx(ensemble_row["nll"]))]
    assert "README.md/text_summary" in events.Tags()["tensors"]


def test_mlflow_run_holds_metrics_params_and_files_once_across_a_resume(
    tiny_model_dir, questions_files, tmp_path, monkeypatch, one_thread
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    _train(
        tiny_model_dir,
        questions_files,
        out,
        "--runtime.logger",
        "mlflow",
        interrupt_at_epoch=1,
        monkeypatch=monkeypatch,
    )

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as any reader of a file store
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("loraens")
    (run,) = client.search_runs([experiment.experiment_id])  # the resume continued the run
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["ensemble.members"] == str(MEMBERS)
    assert run.data.params["runtime.logger"] == "mlflow"
    for tag, by_epoch in _expected(out).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert [step for step, _ in history] == list(range(1, EPOCHS + 1)), tag  # each once
        assert [v for _, v in history] == pytest.approx([by_epoch[s] for s in (1, 2, 3)]), tag
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"README.md", "config.yaml", "metrics.jsonl", "predictions.jsonl"} <= artifacts
    card = client.download_artifacts(run.info.run_id, "README.md", str(tmp_path))
    assert open(card).read() == (out / "README.md").read_text()


def test_a_missing_logger_package_fails_before_training_with_the_install_command(
    tiny_model_dir, questions_files, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "run"
    args = train_argv(tiny_model_dir, *questions_files, out, "--runtime.logger", "tensorboard")
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert "pip install 'loraens[tensorboard]'" in err
    assert not (out / "checkpoint").exists()


def test_csv_logger_writes_no_tracker_files(tmp_path):
    from loraens.config import TrainConfig
    from loraens.rundir import RunDir

    run = RunDir(tmp_path)
    with open_tracker(TrainConfig(), run) as tracker:
        tracker.log_epochs([{"epoch": 1, "split": "train", "member": 0, "loss": 1.0}])
    assert list(tmp_path.iterdir()) == []


def test_epoch_metrics_names_and_means():
    rows = [
        {"epoch": 1, "split": "train", "member": 0, "loss": 1.0},
        {"epoch": 1, "split": "train", "member": 1, "loss": 3.0},
        {"epoch": 1, "split": "eval", "member": "ensemble", "nll": 0.5, "accuracy": 1},
        {"epoch": 2, "split": "eval", "member": 12, "ece": 0.25},
    ]
    assert epoch_metrics(rows) == {
        1: {
            "train/member-00/loss": 1.0,
            "train/member-01/loss": 3.0,
            "train/mean/loss": 2.0,
            "eval/ensemble/nll": 0.5,
            "eval/ensemble/accuracy": 1.0,
        },
        2: {"eval/member-12/ece": 0.25},
    }


def test_tracking_uri_needs_a_logger():
    from loraens.config import RuntimeConfig

    with pytest.raises(ValueError, match="runtime.logger"):
        RuntimeConfig(tracking_uri="file:/tmp/x")
    with pytest.raises(ValueError, match="runtime.logger must be one of"):
        RuntimeConfig(logger="wandb")  # type: ignore[arg-type]
