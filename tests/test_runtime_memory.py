"""The peak memory a run reports is its own: resetting the high-water mark forgets an earlier
allocation in the same process."""

import os
import sys

import numpy as np
import pytest
import torch

from loraens.runtime import _malloc_trim, peak_memory_gb, reset_peak_memory

CPU = torch.device("cpu")


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/clear_refs is Linux's")
def test_a_reset_forgets_an_earlier_peak_and_a_later_allocation_counts():
    block = np.ones(400_000_000 // 8)  # 400 MB touched, then freed
    high = peak_memory_gb(CPU)
    del block
    reset_peak_memory(CPU)
    after_reset = peak_memory_gb(CPU)
    assert after_reset < high - 0.3
    again = np.ones(200_000_000 // 8)
    assert peak_memory_gb(CPU) > after_reset + 0.15
    del again


def test_half_precision_on_cpu_caps_onednns_kernel_cache_unless_the_user_did(monkeypatch):
    from loraens.runtime import KERNEL_CACHE_CAPACITY, resolve_runtime

    variable = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
    monkeypatch.delenv(variable, raising=False)
    resolve_runtime("cpu", "fp32")
    assert variable not in os.environ  # fp32 matmuls do not go through oneDNN's cache
    resolve_runtime("cpu", "bf16")
    assert os.environ[variable] == KERNEL_CACHE_CAPACITY
    monkeypatch.setenv(variable, "7")
    resolve_runtime("cpu", "bf16")
    assert os.environ[variable] == "7"


@pytest.mark.skipif(
    sys.platform != "linux" or _malloc_trim() is None, reason="clear_refs and glibc's malloc_trim"
)
def test_a_reset_does_not_count_the_heap_an_earlier_run_freed_but_the_allocator_kept():
    # 1 KB objects are malloc'ed on the heap (not mmap'ed, not pymalloc's); keeping every 64th
    # alive leaves holes the heap cannot shrink past, so glibc keeps ~300 MB resident.
    chunks = [bytes(1024) for _ in range(300_000)]
    kept = chunks[::64]
    del chunks
    retained = current_resident_gb()
    reset_peak_memory(CPU)
    assert peak_memory_gb(CPU) < retained - 0.2
    del kept


def current_resident_gb() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024 / 1e9
