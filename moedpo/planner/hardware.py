"""The devices the planner plans for: published peak dense bf16 FLOP/s, memory and its
bandwidth per device, and the links between devices (one direction, bytes/s per device).

Sources: NVIDIA's H100/H200/B200/A100 SXM datasheets (dense, without sparsity; float32
matmuls at the TF32 tensor-core rate, torch's `high` matmul precision); Google Cloud's TPU
system-architecture pages (v4, v5e, v5p, v6e; float32 matmuls run as bf16 passes, a third of
the bf16 rate). The links between nodes are a 400 Gb/s NIC per GPU (InfiniBand NDR) and, for
TPU slices, the data-centre network per chip: estimates, stated as such in the output. `cpu`
is timed on this machine when first asked for.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace

import torch

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    memory: float  # bytes per device
    bf16_flops: float  # peak dense FLOP/s per device
    fp32_flops: float  # peak float32 matmul FLOP/s (TF32 on GPUs)
    memory_bandwidth: float  # bytes/s per device
    fast_link: float  # bytes/s per device, one direction, inside a node / slice (NVLink, ICI)
    slow_link: float  # bytes/s per device, one direction, across nodes / slices (IB, DCN)
    devices_per_node: int  # devices that share the fast link
    kind: str  # cuda | xla | cpu: the backend a run on it uses
    source: str


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("h100-80gb", 80 * GB, 989e12, 494e12, 3.35e12, 450 * GB, 50 * GB, 8, "cuda",
             "NVIDIA H100 SXM datasheet; IB 400 Gb/s per GPU"),
    Hardware("h200", 141 * GB, 989e12, 494e12, 4.8e12, 450 * GB, 50 * GB, 8, "cuda",
             "NVIDIA H200 SXM datasheet; IB 400 Gb/s per GPU"),
    Hardware("b200", 180 * GB, 2.25e15, 1.1e15, 8e12, 900 * GB, 50 * GB, 8, "cuda",
             "NVIDIA HGX B200 datasheet; IB 400 Gb/s per GPU"),
    Hardware("a100-80gb", 80 * GB, 312e12, 156e12, 2.039e12, 300 * GB, 25 * GB, 8, "cuda",
             "NVIDIA A100 SXM datasheet; IB 200 Gb/s per GPU"),
    Hardware("tpu-v4", 32 * 2**30, 275e12, 275e12 / 3, 1.2e12, 150 * GB, 12.5 * GB, 4096, "xla",
             "Cloud TPU v4 page (ICI 2400 Gb/s per chip); DCN estimated 100 Gb/s per chip"),
    Hardware("tpu-v5e", 16 * GB, 197e12, 197e12 / 3, 819 * GB, 200 * GB, 3.125 * GB, 256,
             "xla", "Cloud TPU v5e page (ICI 400 GB/s bidirectional; 2 x 100 Gb/s NIC per "
             "8-chip host)"),
    Hardware("tpu-v5p", 95 * GB, 459e12, 459e12 / 3, 2.765e12, 300 * GB, 12.5 * GB, 8960,
             "xla", "Cloud TPU v5p page (ICI 4800 Gb/s per chip); DCN estimated 100 Gb/s per "
             "chip"),
    Hardware("tpu-v6e", 32 * GB, 918e12, 918e12 / 3, 1.638e12, 400 * GB, 12.5 * GB, 256, "xla",
             "Cloud TPU v6e page (ICI 800 GB/s bidirectional); DCN estimated 100 Gb/s per "
             "chip"),
)}
NAMES = (*HARDWARE, "cpu")


def hardware(name: str) -> Hardware:
    """The named entry; `cpu` is this machine, its peak and bandwidth timed once."""
    if name == "cpu":
        return this_cpu()
    if name not in HARDWARE:
        raise ValueError(f"--hardware {name}: unknown; choose one of {', '.join(NAMES)}")
    return HARDWARE[name]


@functools.cache
def this_cpu() -> Hardware:
    """This machine as one device: float32 matmul FLOP/s and copy bandwidth, each the best of
    a few timed runs (a second or so), memory the machine's."""
    import os

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = max(2 * n**3 / _best_time(lambda: a @ b) for _ in range(3))
    big = torch.empty(64 * 2**20 // 4)
    other = torch.empty_like(big)
    bandwidth = max(2 * big.nbytes / _best_time(lambda: other.copy_(big)) for _ in range(3))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", float(memory), flops, flops, bandwidth, bandwidth, bandwidth, 1,
                    "cpu", "timed on this machine (float32 matmul, copy)")


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def with_memory(entry: Hardware, memory_gb: float) -> Hardware:
    """The entry with another memory size (a smaller part, or a budget kept free)."""
    return replace(entry, memory=memory_gb * GB)
