"""keep_freed_host_memory: a freed block is reused by the next allocation of its size instead
of being mapped (and page-faulted) anew. Measured in fresh processes: the setting is
process-wide."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from moedpo.parallel.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
def faults_of_one_step():  # one step's activations: 24 x 1 MB made, written, all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.empty(1 << 18).fill_(1.0) for _ in range(24)]
    del kept
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_step()
print(applied, min(faults_of_one_step() for _ in range(5)))
"""


def later_step_faults(mode: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_not_faulted_in_again(monkeypatch):
    pages = (24 << 20) // 4096
    applied, kept = later_step_faults("keep")
    _, default = later_step_faults("default")
    assert applied == "True"
    assert default > pages * 0.9  # glibc gives the freed 24 MB back: every page faults again
    assert kept < pages * 0.05
    # The user's own glibc settings win: nothing is changed.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    applied, _ = later_step_faults("keep", env=dict(__import__("os").environ))
    assert applied == "False"
