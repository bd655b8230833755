"""``se3t.runtime.return_freed_memory``: freed tensors leave the resident set (glibc), bad thresholds are refused."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from se3t.runtime import heap, return_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# 160 tensors of 1 MiB, each followed by one of 256 KiB, then the 1 MiB ones freed: from the heap (glibc's threshold
# raised by the first freed 2 MiB mapping) their pages stay resident, as the blocks after them pin the heap's top.
_FRAGMENT = textwrap.dedent("""
    import sys
    import torch
    from se3t.runtime.heap import return_freed_memory

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    if sys.argv[1] == "on":
        assert return_freed_memory() is True
    first = torch.ones(1 << 19)
    del first
    base = rss_mib()
    large, small = [], []
    for _ in range(160):
        large.append(torch.ones(1 << 18))
        small.append(torch.ones(1 << 16))
    peak = rss_mib()
    del large
    print(peak - base, rss_mib() - base)
""")


def _retained_mib(mode: str) -> tuple:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return tuple(float(v) for v in out.stdout.split())


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_tensors_leave_the_resident_set():
    alive = 160 * 0.25  # MiB of the 256 KiB tensors, still alive at the end
    grown, kept = _retained_mib("off")
    assert grown > 190 and kept > alive + 100, (grown, kept)  # the premise: glibc keeps the freed pages
    grown, kept = _retained_mib("on")
    assert grown > 190 and kept < alive + 8, (grown, kept)


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda *a: pytest.fail("must not load the C library"))
    assert return_freed_memory() is False


@pytest.mark.parametrize("threshold", [0, 4095, heap.MAX_THRESHOLD_BYTES + 1, 1.5e5, True, "128k"])
def test_bad_thresholds_are_refused(threshold):
    with pytest.raises(ValueError, match="threshold_bytes must be an int"):
        return_freed_memory(threshold)
