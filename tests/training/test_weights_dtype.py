"""model.dtype: the frozen base in half precision, LoRA weights and optimiser in float32."""

import json

import pytest
import torch
from helpers import train_argv
from safetensors.torch import load_file

from loraens.cli.main import main
from loraens.runtime import Runtime, resolve_weights_dtype

CPU_FP32 = Runtime(torch.device("cpu"), None)
CPU_BF16 = Runtime(torch.device("cpu"), torch.bfloat16)
GPU_BF16 = Runtime(torch.device("cuda"), torch.bfloat16)
GPU_FP16 = Runtime(torch.device("cuda"), torch.float16)


def test_auto_is_bf16_only_on_a_gpu_computing_in_bf16():
    assert resolve_weights_dtype("auto", GPU_BF16) == torch.bfloat16
    for runtime in (CPU_FP32, CPU_BF16, GPU_FP16):
        assert resolve_weights_dtype("auto", runtime) == torch.float32
    assert resolve_weights_dtype("fp16", GPU_FP16) == torch.float16


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
