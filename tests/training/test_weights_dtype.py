"""model.dtype: the frozen base in half precision, LoRA weights and optimiser in float32."""

import json

import numpy as np
import pytest
import torch
from helpers import make_questions, train_argv
from safetensors.torch import load_file

from loraens.cli.main import main
from loraens.runtime import Runtime, resolve_matmul_dtype, resolve_weights_dtype

CPU_FP32 = Runtime(torch.device("cpu"), None)
CPU_BF16 = Runtime(torch.device("cpu"), torch.bfloat16)
GPU_BF16 = Runtime(torch.device("cuda"), torch.bfloat16)
GPU_FP16 = Runtime(torch.device("cuda"), torch.float16)


def test_auto_loads_fp32_and_holds_matmul_weights_in_the_compute_dtype():
    for runtime in (CPU_FP32, CPU_BF16, GPU_BF16, GPU_FP16):
        assert resolve_weights_dtype("auto", runtime) == torch.float32
        assert resolve_matmul_dtype("auto", runtime) == (runtime.autocast_dtype or torch.float32)
    assert resolve_weights_dtype("fp16", GPU_FP16) == torch.float16
    assert resolve_matmul_dtype("bf16", CPU_BF16) == torch.bfloat16


def test_half_weights_under_fp32_compute_are_refused():
    with pytest.raises(ValueError, match="runtime.precision"):
        resolve_weights_dtype("bf16", CPU_FP32)


def test_training_on_bf16_weights_keeps_float32_adapters(tiny_model_dir, questions_files, tmp_path):
    out = tmp_path / "run"
    extra = ("--model.dtype", "bf16", "--runtime.precision", "bf16")
    main(train_argv(tiny_model_dir, *questions_files, out, *extra, members=2, epochs=1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_dtype"] == "torch.bfloat16"
    adapter = load_file(out / "members" / "member-00" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # it trained


def _adapters(run) -> dict[str, torch.Tensor]:
    members = sorted((run / "members").glob("member-*"))
    return {
        f"{m.name}/{k}": t
        for m in members
        for k, t in load_file(m / "adapter_model.safetensors").items()
    }


def _eval_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "eval"]


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, tiny_model_dir):
    """The same bf16 training three ways: matmul weights held in bf16 (auto), evaluated 12 and
    1 question(s) at a time, and the old layout (fp32 weights cast by autocast every pass)."""
    from loraens.data.files import write_questions_jsonl

    root = tmp_path_factory.mktemp("bf16-runs")
    files = (root / "train.jsonl", root / "eval.jsonl")
    write_questions_jsonl(make_questions(24, seed=1), files[0])
    write_questions_jsonl(make_questions(12, seed=2), files[1])
    runs = {}
    for name, extra in {
        "auto": (),
        "auto_eval_1": ("--runtime.eval_batch_size", "1"),
        "fp32_weights": ("--model.dtype", "fp32"),
    }.items():
        out = root / name
        argv = (*extra, "--runtime.precision", "bf16", "--runtime.packing", "false")
        main(train_argv(tiny_model_dir, *files, out, *argv, members=2, epochs=2))
        runs[name] = out
    return runs


def test_bf16_weights_train_bit_identically_to_autocast_over_fp32_weights(bf16_runs):
    summary = json.loads((bf16_runs["auto"] / "summary.json").read_text())
    assert summary["matmul_weights_dtype"] == "torch.bfloat16"
    assert summary["weights_dtype"] == "torch.float32"  # embeddings, norms, LM head
    ours, autocast = _adapters(bf16_runs["auto"]), _adapters(bf16_runs["fp32_weights"])
    assert ours.keys() == autocast.keys()
    for key in ours:
        assert torch.equal(ours[key], autocast[key]), key


def test_a_bf16_runs_evaluation_does_not_depend_on_its_batch_size(bf16_runs):
    assert json.loads((bf16_runs["auto"] / "summary.json").read_text())["score_precision"] == "fp32"
    for a, b in zip(
        _eval_rows(bf16_runs["auto"]), _eval_rows(bf16_runs["auto_eval_1"]), strict=True
    ):
        assert a.keys() == b.keys()
        for key in ("nll", "accuracy", "ece", "brier"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a, b)


def test_loading_a_bf16_run_reproduces_its_own_scores(bf16_runs):
    """evaluate / predict / serve read the same bf16-rounded weights the members trained
    against (upcast for fp32 scoring), so they agree with the run's own evaluation."""
    from loraens.data.files import load_questions_file
    from loraens.evaluation.evaluate import score_questions
    from loraens.rundir import RunDir
    from loraens.rundir.load import load_run

    run = bf16_runs["auto"]
    config = RunDir(run).read_config()
    questions = load_questions_file(config.data.eval_file)
    loaded = load_run(run, "cpu")
    assert all(p.dtype == torch.float32 for p in loaded.ensemble.model.parameters())
    scores = score_questions(loaded, questions, batch_size=5)
    lines = (run / "predictions.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        saved = np.asarray(json.loads(line)["member_log_probs"])  # (members, own options)
        ours = scores[:, i, : saved.shape[1]]
        np.testing.assert_allclose(ours, saved, rtol=0, atol=1e-6)
