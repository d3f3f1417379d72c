"""Device and precision choices, made once per run."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def cpu_supports_bf16() -> bool:
    # AVX512-BF16 or AMX make bf16 matmuls about twice as fast as fp32 on CPU; without them bf16
    # is emulated and slower than fp32, so "auto" must not pick it.
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512_BF16", "AMX") or "AMX" in capability:
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available here.")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    if precision not in dtypes:
        raise ValueError(f"precision must be one of auto, fp32, bf16, fp16; got {precision!r}.")
    return Runtime(device=dev, autocast_dtype=dtypes[precision])
