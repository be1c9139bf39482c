"""keep_freed_host_memory: memory a step frees stays with the process, and the next step's
allocations reuse it instead of faulting fresh pages in. Measured in fresh processes (the
setting is process-wide) with glibc's own accounting (mallinfo2)."""

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource, sys, torch
from moedpo.parallel.host_memory import keep_freed_host_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None

def step():  # one step's activations: 96 x 1 MB made, written, all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.empty(1 << 18).fill_(1.0) for _ in range(96)]
    del kept
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, libc.mallinfo2().fordblks

step()
faults, free_bytes = step()
print(applied, faults, free_bytes)
"""
PAGES = (96 << 20) // 4096


def second_step(mode: str, **env: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_stays_and_is_reused():
    applied, faults, free_bytes = second_step("keep")
    assert applied == "True"
    assert free_bytes >= 96 << 20  # the step's 96 MB, freed, still held for the next step
    assert faults < PAGES * 0.1  # and reused: hardly a page faulted in again
    # glibc's default gives back whatever exceeds its trim threshold (64 MB at the most).
    _, _, default_free = second_step("default")
    assert default_free < 64 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_user_malloc_settings_win():
    applied, _, free_bytes = second_step("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False" and free_bytes < 64 << 20
