"""Device and precision choices, made once per run."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import sys
from dataclasses import dataclass, replace

import torch

from loraens.config import RuntimeConfig


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    # How passes are shaped (runtime.packing, .pack_tokens, .memory_budget_gb): speed and
    # memory only, results agree within float tolerance whatever these are.
    packing: bool = True
    pack_tokens: int = 256
    memory_budget_gb: float | None = None  # None: derived from the free memory (trainer)

    @property
    def width_multiple(self) -> int:
        """Passes are padded to a multiple of this many positions. On CPU in half precision the
        matmuls run through oneDNN, which builds and caches a kernel per shape: widths that
        vary with every batch kept adding kernels (about 25 MB of resident memory per training
        step of the bf16 demo, on an AMX Xeon), a few fixed widths stop that at a small padding
        cost. Elsewhere (fp32 through MKL, CUDA) shapes cost nothing and rows are not padded."""
        half = self.autocast_dtype in (torch.bfloat16, torch.float16)
        return 64 if half and self.device.type == "cpu" else 1

    @property
    def row_tokens(self) -> int | None:
        """Token budget of a packed row, None when every question gets a row of its own."""
        return self.pack_tokens if self.packing else None

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


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device`` (None: plain fp32)."""
    dtypes = {"fp32": None, **_HALF}
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    if precision not in dtypes:
        raise ValueError(f"precision must be one of auto, fp32, bf16, fp16; got {precision!r}.")
    return dtypes[precision]


# oneDNN, which runs CPU bf16/fp16 matmuls, keeps up to 1024 compiled kernels (one per shape)
# with their buffers. Passes vary in shape, so a run kept adding them: the bf16 demo's resident
# set grew by some 200 MB per epoch, to 2.67 GB; capped at 64 it peaked at 2.23 GB, at the same
# speed (2-core AMX Xeon, /usr/bin/time -v on `make demo` in bf16, 2026-12-05).
KERNEL_CACHE_CAPACITY = "64"


def limit_kernel_cache() -> None:
    """Cap oneDNN's kernel cache (see :data:`KERNEL_CACHE_CAPACITY`), unless the user set it.
    oneDNN reads the variable when it first builds a kernel, so this runs before any half
    matmul: when a run resolves to half precision on CPU."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE_CAPACITY)


def resolve_runtime(
    device: str = "auto",
    precision: str = "auto",
    *,
    packing: bool = True,
    pack_tokens: int = 256,
    memory_budget_gb: float | None = None,
) -> Runtime:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available here.")
    dtype = resolve_precision(dev, precision)
    if dev.type == "cpu" and dtype is not None:
        limit_kernel_cache()
    return Runtime(dev, dtype, packing, pack_tokens, memory_budget_gb)


def scoring_runtime(runtime: Runtime, precision: str) -> Runtime:
    """``runtime`` with the autocast dtype of ``precision`` (runtime.score_precision): a
    training run may compute in bf16 and still score its questions in fp32."""
    return replace(runtime, autocast_dtype=resolve_precision(runtime.device, precision))


def runtime_from_config(config: RuntimeConfig, device: str | None = None) -> Runtime:
    """:func:`resolve_runtime` with every option of ``config`` (``device`` overrides its
    device: a distributed rank's own GPU)."""
    return resolve_runtime(
        device or config.device,
        config.precision,
        packing=config.packing,
        pack_tokens=config.pack_tokens,
        memory_budget_gb=config.memory_budget_gb,
    )


def resolve_weights_dtype(dtype: str, runtime: Runtime) -> torch.dtype:
    """Dtype the frozen base model is loaded in (``model.dtype``): the whole model for an
    explicit half dtype, float32 for "auto" (whose matmul weights
    :func:`resolve_matmul_dtype` then narrows).

    Half-precision weights under fp32 compute are refused rather than silently computing in
    half precision.
    """
    dtypes = {"fp32": torch.float32, **_HALF}
    if dtype == "auto":
        return torch.float32
    if dtype not in dtypes:
        raise ValueError(f"model.dtype must be one of auto, fp32, bf16, fp16; got {dtype!r}.")
    if dtypes[dtype] != torch.float32 and runtime.autocast_dtype is None:
        raise ValueError(
            f"model.dtype={dtype} keeps the base weights in half precision, so its matmuls "
            f"cannot run in fp32 as runtime.precision=fp32 asks: use --runtime.precision "
            f"{dtype} (or auto on a GPU), or --model.dtype fp32."
        )
    return dtypes[dtype]


def resolve_matmul_dtype(dtype: str, runtime: Runtime) -> torch.dtype:
    """Dtype the decoder's linear weights are held in (``model.dtype``).

    "auto" holds them in the compute dtype: autocast would cast them to it on every pass
    anyway, so a half copy is what the matmuls read, minus the per-pass casts and the fp32
    copy (half the weights' memory). Embeddings, norms and the LM head stay float32, as autocast
    computes them, so training is bit-identical to autocast over fp32 weights.
    """
    if dtype == "auto":
        return runtime.autocast_dtype or torch.float32
    return resolve_weights_dtype(dtype, runtime)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where there is none (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS around a run's scoring of a question set.

    glibc keeps freed pages for reuse, but scoring and training ask for tensors of other sizes,
    so each evaluation left the resident set higher for the next epoch's training (before
    oneDNN's kernel cache was capped, :data:`KERNEL_CACHE_CAPACITY`, the bf16 demo on a 2-core
    AMX Xeon peaked at 2.6, 3.3 and 3.5 GB in its three epochs for the same passes). Twice per
    evaluation costs two re-faults of the freed pages; trimming after every optimiser step
    cost 10% of the training speed (one epoch of the demo's steps, same machine).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak afresh, so that :func:`peak_memory_gb` is this work's and not an
    earlier one's in the same process (an experiment runs its cells one after another). On
    Linux writing 5 to /proc/self/clear_refs resets the resident set's high-water mark; where
    that is not possible the peak stays the process's.

    The mark restarts from the resident set as it is, so the heap an earlier cell freed but
    glibc kept is handed back first: without it a cell run after a larger one (TFB after
    Laplace-LoRA) counts the larger one's leftover heap as its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_gb(device: torch.device) -> float:
    """The peak memory since :func:`reset_peak_memory` (or the process's start): allocated on
    a GPU, the resident set's high-water mark on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e9  # macOS: bytes; Linux: KiB
