"""Interruption, resume, reproducibility and bad numbers, on a tiny model in real subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import make_questions, train_argv
from safetensors.torch import load_file

from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl
from loraens.rundir import read_jsonl

EPOCHS = 4
# SIGKILL does not exist on Windows, and SIGINT cannot be sent to a child process there.
POSIX_SIGNALS = pytest.mark.skipif(os.name != "posix", reason="sends POSIX signals")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_questions_jsonl(make_questions(120, seed=1), folder / "train.jsonl")
    write_questions_jsonl(make_questions(24, seed=2), folder / "eval.jsonl")
    return folder / "train.jsonl", folder / "eval.jsonl"


def _args(model_dir, data_files, out, *extra):
    return train_argv(
        model_dir,
        *data_files,
        out,
        "--lora.dropout",
        "0.1",
        *extra,
        members=2,
        epochs=EPOCHS,
        batch_size=4,
    )


# `loraens train ARGS` in a child that stops inside the trainer's on_step hook after the first
# step of epoch 2 (epoch 1 checkpointed, the adapters already moved past it), creates MARKER
# and waits there. A signal sent once MARKER exists lands at that very point: racing a running
# child instead lets a fast or busy machine finish the run first.
_PAUSED_RUN = """
import signal, sys, time
from pathlib import Path

import loraens.training.run as run
from loraens.cli.main import main

marker, args = Path(sys.argv[1]), sys.argv[2:]
announce = run.announce_duration
# A shell's background job starts with SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: restore it, as a terminal's Ctrl-C would find it.
signal.signal(signal.SIGINT, signal.default_int_handler)


def pausing(trainer, *rest, **kwargs):
    hook, steps = announce(trainer, *rest, **kwargs), 0

    def on_step(seconds):
        nonlocal steps
        hook(seconds)
        steps += 1
        if steps == trainer.steps_per_epoch() + 1:
            marker.touch()
            time.sleep(600)
            sys.exit("paused at epoch 2 and never signalled")

    return on_step


run.announce_duration = pausing
main(args)
"""


def _spawn_paused(args, marker):
    return subprocess.Popen(
        [sys.executable, "-c", _PAUSED_RUN, str(marker), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until_paused(run_dir, process, marker, timeout=600):
    deadline = time.monotonic() + timeout  # a readiness wait, not a timing assertion
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached epoch 2"
        time.sleep(0.01)
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["epochs_done"] == 1


def _outputs(run_dir):
    adapters = {
        m: load_file(run_dir / "members" / f"member-0{m}" / "adapter_model.safetensors")
        for m in range(2)
    }
    log_probs = load_file(run_dir / "eval_log_probs.safetensors")
    return adapters, read_jsonl(run_dir / "metrics.jsonl"), log_probs


def _assert_same(a, b):
    adapters_a, rows_a, log_probs_a = a
    adapters_b, rows_b, log_probs_b = b
    assert rows_a == rows_b
    for m in adapters_a:
        for key, tensor in adapters_a[m].items():
            assert tensor.equal(adapters_b[m][key]), key
    # Every evaluated epoch, bit for bit (an epoch redone after the resume replaces its entry).
    expected = [*(f"epoch-{e:04d}" for e in range(1, EPOCHS + 1)), "labels"]
    assert sorted(log_probs_a) == sorted(log_probs_b) == expected
    for key, tensor in log_probs_a.items():
        assert tensor.equal(log_probs_b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    main(_args(tiny_model_dir, data_files, out))
    return out


def test_same_seed_gives_bit_identical_adapters_and_metrics(
    uninterrupted, tiny_model_dir, data_files, tmp_path
):
    main(_args(tiny_model_dir, data_files, tmp_path / "again"))
    _assert_same(_outputs(uninterrupted), _outputs(tmp_path / "again"))
    provenance = json.loads((uninterrupted / "provenance.json").read_text())
    assert provenance["versions"]["torch"] and len(provenance["model_sha256"]) == 64
    assert len(provenance["train_data_sha256"]) == 64


@POSIX_SIGNALS
def test_sigkill_mid_run_then_resume_equals_uninterrupted(
    uninterrupted, tiny_model_dir, data_files, tmp_path
):
    out, marker = tmp_path / "killed", tmp_path / "paused"
    process = _spawn_paused(_args(tiny_model_dir, data_files, out), marker)
    _wait_until_paused(out, process, marker)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists()
    # A kill can land mid-write and leave atomic_path's temporary sibling behind; plant a torn
    # one (whether or not this kill left one) so that resuming provably never reads it.
    torn = out / ".checkpoint.killed.tmp" / "checkpoint"
    torn.mkdir(parents=True)
    (torn / "state.json").write_text('{"epochs_done": 99, torn')

    main(["train", "--resume", str(out)])
    _assert_same(_outputs(uninterrupted), _outputs(out))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["epochs_done"] == EPOCHS


@POSIX_SIGNALS
def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_resume(
    uninterrupted, tiny_model_dir, data_files, tmp_path
):
    out, marker = tmp_path / "interrupted", tmp_path / "paused"
    process = _spawn_paused(_args(tiny_model_dir, data_files, out), marker)
    _wait_until_paused(out, process, marker)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=600)  # a bound on a hang, not a timing assertion
    assert process.returncode == 130
    assert f"loraens train --resume {out}" in err and "Traceback" not in err
    # rerunning the very same command continues the run
    main(_args(tiny_model_dir, data_files, out))
    _assert_same(_outputs(uninterrupted), _outputs(out))


def test_non_finite_loss_stops_with_epoch_step_member_and_keeps_last_checkpoint(
    tiny_model_dir, data_files, tmp_path, monkeypatch, capsys
):
    import loraens.training.trainer as trainer_module

    real = trainer_module.vocab_log_probs
    calls = {"n": 0}

    def poisoned(model, hidden):
        calls["n"] += 1
        out = real(model, hidden)
        return out * float("nan") if calls["n"] == 40 else out  # epoch 2 (30 steps/epoch)

    monkeypatch.setattr(trainer_module, "vocab_log_probs", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tiny_model_dir, data_files, out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "epoch 2, step 10" in err and "member(s) 0, 1" in err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epochs_done"] == 1
    assert not (out / "members").exists() and not (out / "summary.json").exists()
    assert "NaN" not in (out / "metrics.jsonl").read_text()


def test_checkpoint_from_another_format_is_refused(uninterrupted, tmp_path, capsys):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(uninterrupted, out)
    (out / "summary.json").unlink()
    state_file = out / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    state["format_version"] = 99
    state_file.write_text(json.dumps(state))
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(out)])
    assert "format 99" in capsys.readouterr().err


def test_unknown_config_keys_and_bad_values_are_refused(tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text("optim:\n  lr: 1e-4\n  lrr: 3\n")
    for argv in (
        ["train", "--config", str(preset)],
        ["train", "--optim.lr", "-1"],
        ["train", "--lora.rank", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "lrr" in err and "optim.lr must be > 0" in err and "lora.rank must be >= 1" in err


def test_model_folder_that_is_not_a_causal_lm_is_refused(tmp_path, capsys, data_files):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=50,
        )
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(SystemExit):
        main(_args(tmp_path / "bert", data_files, tmp_path / "run"))
    assert "causal language model" in capsys.readouterr().err
