"""Host memory reuse between training steps on the CPU backend.

glibc hands blocks above its mmap threshold straight back to the OS when they are freed, and
trims the heap's free top above its trim threshold. A training step allocates and frees
tensors of the same sizes every time (activations, gradients), so on the CPU each step maps
them anew and faults every page in again, zero-filled by the kernel: about 10k page faults
per step on the throughput benchmark's tiny model. With both thresholds raised, freed memory
stays with the process for the next step: half the page faults, 8-15% less step time, the
same peak RSS (benchmarks/RESULTS.md). This is what jemalloc or tcmalloc would buy, without
an LD_PRELOAD; mallopt is glibc's documented switch for it.

Blocks above glibc's largest mmap threshold (32 MB: an MoE layer's stacked expert gradients
are 128 MB on the small benchmark model) are still mapped anew each step, one page fault per
4 KB. PyTorch's CPU allocator can ask for transparent huge pages for its large blocks
(`THP_MEM_ALLOC_ENABLE`, read once, at its first large allocation): one fault per 2 MB.
Measured on the small model's default step, alternating: 4209 and 4594 ms with it, 5164 and
4874 ms without (about 12% less; benchmarks/RESULTS.md). Kernels whose THP mode is `never`
ignore the request.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it are still mapped on their own
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
THP_SETTING = "THP_MEM_ALLOC_ENABLE"  # PyTorch's switch (c10's CPU allocator)


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when applied. Left alone
    off glibc and where the user set glibc's own MALLOC_* variables."""
    if platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    applied = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
               and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not applied:
        log.warning("mallopt refused the thresholds; freed host memory goes back to the OS")
    return applied


def huge_pages_for_large_tensors() -> bool:
    """Have PyTorch's CPU allocator madvise huge pages for its large blocks; True when this
    call turned it on. The user's own THP_MEM_ALLOC_ENABLE wins; call it before the process
    allocates its first large tensor (the allocator reads the setting once)."""
    if THP_SETTING in os.environ:
        return False
    os.environ[THP_SETTING] = "1"
    return True
