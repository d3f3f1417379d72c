"""`loraens train` under torchrun (2 CPU processes, gloo) against the single-process run.

Each torchrun launch costs a few seconds of imports per process, so the module starts three:
members split over the ranks, one member's batches split over the ranks, and a run whose rank 1
fails (then resumed in one process).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_questions, train_argv
from safetensors.torch import load_file

from loraens.cli.main import main
from loraens.data.files import write_questions_jsonl
from loraens.distributed import Placement, placements
from loraens.rundir import read_jsonl

FP32 = ("--runtime.precision", "fp32")
FAIL_ON_RANK = Path(__file__).with_name("fail_on_rank.py")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_questions_jsonl(make_questions(40, seed=1), folder / "train.jsonl")
    write_questions_jsonl(make_questions(12, seed=2), folder / "eval.jsonl")
    return folder / "train.jsonl", folder / "eval.jsonl"


def _torchrun(args: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    entry = ["-m", "loraens.cli.main"] if script is None else [str(script)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "--standalone", *entry, *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )


def _adapters(run: Path) -> dict[str, dict]:
    return {
        folder.name: load_file(folder / "adapter_model.safetensors")
        for folder in sorted((run / "members").iterdir())
    }


def _assert_equal_runs(a: Path, b: Path) -> None:
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")
    assert (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()
    adapters_a, adapters_b = _adapters(a), _adapters(b)
    assert adapters_a.keys() == adapters_b.keys()
    for member, tensors in adapters_a.items():
        for key, tensor in tensors.items():
            assert tensor.equal(adapters_b[member][key]), (member, key)


def _assert_close_runs(a: Path, b: Path, atol: float) -> None:
    rows_a, rows_b = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [(r["epoch"], r["split"], r["member"]) for r in rows_a] == [
        (r["epoch"], r["split"], r["member"]) for r in rows_b
    ]
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        for key, value in row_a.items():
            if isinstance(value, float):
                assert value == pytest.approx(row_b[key], rel=1e-5, abs=1e-6), key
    adapters_a, adapters_b = _adapters(a), _adapters(b)
    for member, tensors in adapters_a.items():
        for key, tensor in tensors.items():
            assert (tensor - adapters_b[member][key]).abs().max() <= atol, (member, key)


@pytest.fixture(scope="module")
def single_process_m4(tiny_model_dir, data_files, tmp_path_factory):
    """M = 4 in one process, two members per pass: what each of two ranks computes."""
    out = tmp_path_factory.mktemp("runs") / "single"
    main(train_argv(tiny_model_dir, *data_files, out, *FP32, "--runtime.members_per_pass", "2",
                    members=4))  # fmt: skip
    return out


def test_the_mode_rule():
    assert placements(5, 2) == [Placement(range(0, 3)), Placement(range(3, 5))]
    assert placements(2, 4) == [
        Placement(range(0, 1), 0, 2),
        Placement(range(0, 1), 1, 2),
        Placement(range(1, 2), 0, 2),
        Placement(range(1, 2), 1, 2),
    ]
    with pytest.raises(ValueError, match="multiple of 2"):
        placements(2, 3)


def test_members_split_over_ranks_equal_the_single_process_run(
    single_process_m4, tiny_model_dir, data_files, tmp_path
):
    out = tmp_path / "two-ranks"
    result = _torchrun(train_argv(tiny_model_dir, *data_files, out, *FP32, members=4))
    assert result.returncode == 0, result.stderr[-3000:]
    # Each rank stacks its 2 members, exactly as the single process's passes of 2: same
    # arithmetic, so bit-identical adapters, metrics and predictions.
    _assert_equal_runs(out, single_process_m4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed_mode"] == "members"
    assert result.stdout.count("Eval on 12 questions") == 1  # only rank 0 prints
    # Against all 4 members in one pass only float rounding may differ (the base matmul over
    # 4 members' rows may block its sums differently from 2 members').
    all_in_one = tmp_path / "one-pass"
    main(train_argv(tiny_model_dir, *data_files, all_in_one, *FP32, members=4))
    _assert_close_runs(out, all_in_one, atol=1e-6)


def test_one_member_split_over_ranks_matches_the_single_process_run(
    tiny_model_dir, data_files, tmp_path
):
    # Batches of 3 split 2 + 1 over the two ranks, and the epoch's last batch (40 = 13·3 + 1)
    # 1 + 0: the gradient sum is weighted by rows, so it equals the full batch's mean-loss
    # gradient up to float rounding, and a rank with no rows still joins the all_reduce.
    args = (*FP32, "--optim.kl_beta", "0.05")
    out, single = tmp_path / "two-ranks", tmp_path / "single"
    result = _torchrun(train_argv(tiny_model_dir, *data_files, out, *args, members=1, batch_size=3))
    assert result.returncode == 0, result.stderr[-3000:]
    main(train_argv(tiny_model_dir, *data_files, single, *args, members=1, batch_size=3))
    assert json.loads((out / "summary.json").read_text())["distributed_mode"] == "data"
    _assert_close_runs(out, single, atol=1e-6)


def test_a_failing_rank_stops_the_job_and_its_checkpoint_resumes_in_one_process(
    single_process_m4, tiny_model_dir, data_files, tmp_path
):
    out = tmp_path / "fails"
    args = train_argv(tiny_model_dir, *data_files, out, *FP32, "--runtime.members_per_pass", "2",
                      members=4)  # fmt: skip
    started = time.monotonic()
    result = _torchrun(["1", "2", *args], script=FAIL_ON_RANK)  # rank 1 raises in epoch 2
    assert result.returncode != 0
    assert time.monotonic() - started < 90  # the other rank does not wait for a timeout
    assert "error (rank 1 of 2): simulated failure on rank 1 in epoch 2" in result.stderr
    assert not (out / "summary.json").exists() and not (out / "members").exists()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epochs_done"] == 1

    # The checkpoint holds all four members in the single-process format: one process
    # continues it and ends exactly where the uninterrupted single-process run did.
    main(["train", "--resume", str(out)])
    _assert_equal_runs(out, single_process_m4)
