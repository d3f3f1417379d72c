"""release_freed_memory against the kernel's own count of the process's resident pages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Run in a fresh interpreter: a heap with holes of a known size, then the resident set before and
# after the release. 64 KiB blocks sit below glibc's mmap threshold, so they live in the heap; a
# 1 KiB block after each keeps them from being the heap's top, which free() alone would return.
_SCRIPT = textwrap.dedent(
    """
    import json
    from loraens.serving.memory import release_freed_memory

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    big, keep = [], []
    for i in range(4000):
        big.append(bytes([i % 251]) * 65536)
        keep.append(bytes([i % 13]) * 1024)
    filled = rss_mb()
    del big
    freed = rss_mb()
    released = release_freed_memory()
    print(json.dumps({"filled": filled, "freed": freed, "released": released, "after": rss_mb()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, needs glibc")
def test_freed_heap_holes_leave_the_resident_set_once_released():
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True
    ).stdout
    m = json.loads(out)
    if not m["released"]:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    # 4000 × 64 KiB = 250 MiB of holes: free() alone keeps them resident, the release does not
    assert m["freed"] > m["filled"] - 50
    assert m["freed"] - m["after"] > 200
