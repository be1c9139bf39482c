"""The devices the planner plans for: published peak dense bf16 FLOP/s, memory and its
bandwidth per device, and the links between devices (one direction, bytes/s per device).

Sources: NVIDIA's H100/H200/B200/A100 SXM datasheets (dense, without sparsity; float32
matmuls at the TF32 tensor-core rate, torch's `high` matmul precision); Google Cloud's TPU
system-architecture pages (v4, v5e, v5p, v6e; float32 matmuls run as bf16 passes, a third of
the bf16 rate). The links between nodes are a 400 Gb/s NIC per GPU (InfiniBand NDR) and, for
TPU slices, the data-centre network per chip: estimates, stated as such in the output. `cpu`
is timed on this machine when first asked for.

No step reaches a datasheet's peak: `efficiency` is the share of it a training step's
compute-bound operations reach, 0.6 unless an entry says otherwise. Megatron-LM reports ~47%
MFU for Mixtral 8x7B on H100 and MaxText 54.9% on TPU v5p, end to end, communication and
routing included, for steps that are mostly matmuls; on this repository's 2-core CPU the
small Mixtral's matmuls ran at 0.58 of the timed square-matmul peak inside a real step (torch
profiler, 2026-12-08). `op_overhead` is the host's time to dispatch one eager operation: a
CPU adds it to every operation's time; a GPU queues kernels ahead, so an operation takes the
longer of its kernel and its launch; XLA compiles the step into one program (0).

Users add entries as a YAML or JSON file of the same fields (`--hardware my-device.yaml`;
`load_entry`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

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
    efficiency: float = 0.6  # share of the peak FLOP/s a step's matmuls reach (see above)
    op_overhead: float = 5e-6  # seconds to dispatch one eager operation (see above)

    def op_seconds(self, flops: float, moved: float, low_precision: bool) -> float:
        """One operation's time: the longer of its FLOPs at the reachable peak and its bytes
        at the memory bandwidth, with the host's dispatch added (CPU) or overlapped (GPU)."""
        peak = (self.bf16_flops if low_precision else self.fp32_flops) * self.efficiency
        device = max(flops / peak, moved / self.memory_bandwidth)
        if self.kind == "cpu":
            return device + self.op_overhead
        return max(device, self.op_overhead)


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
             "Cloud TPU v4 page (ICI 2400 Gb/s per chip); DCN estimated 100 Gb/s per chip",
             op_overhead=0.0),
    Hardware("tpu-v5e", 16 * GB, 197e12, 197e12 / 3, 819 * GB, 200 * GB, 3.125 * GB, 256,
             "xla", "Cloud TPU v5e page (ICI 400 GB/s bidirectional; 2 x 100 Gb/s NIC per "
             "8-chip host)", op_overhead=0.0),
    Hardware("tpu-v5p", 95 * GB, 459e12, 459e12 / 3, 2.765e12, 300 * GB, 12.5 * GB, 8960,
             "xla", "Cloud TPU v5p page (ICI 4800 Gb/s per chip); DCN estimated 100 Gb/s per "
             "chip", op_overhead=0.0),
    Hardware("tpu-v6e", 32 * GB, 918e12, 918e12 / 3, 1.638e12, 400 * GB, 12.5 * GB, 256, "xla",
             "Cloud TPU v6e page (ICI 800 GB/s bidirectional); DCN estimated 100 Gb/s per "
             "chip", op_overhead=0.0),
)}
NAMES = (*HARDWARE, "cpu")


def hardware(name: str) -> Hardware:
    """The named entry, or the entry in the YAML/JSON file `name`; `cpu` is this machine,
    its peak, bandwidth and dispatch time timed once."""
    if name == "cpu":
        return this_cpu()
    if name in HARDWARE:
        return HARDWARE[name]
    if Path(name).suffix in (".yaml", ".yml", ".json"):
        return load_entry(Path(name))
    raise ValueError(f"--hardware {name}: unknown; choose one of {', '.join(NAMES)}, or give "
                     "a .yaml/.json file of an entry (docs/planning.md)")


def load_entry(path: Path) -> Hardware:
    """A user's hardware entry: the fields of `Hardware` (memory and link figures in bytes
    and bytes/s, FLOP/s), `name` defaulting to the file's stem. One-line errors name the
    file and the field."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.is_file():
        raise ValueError(f"--hardware {path}: no such file")
    try:
        entry = OmegaConf.to_container(OmegaConf.load(path))
    except (OmegaConfBaseException, OSError, ValueError) as e:
        raise ValueError(f"--hardware {path}: not YAML/JSON: {e}".splitlines()[0]) from None
    if not isinstance(entry, dict):
        raise ValueError(f"--hardware {path}: must hold a mapping of Hardware's fields")
    known = {f.name: f for f in fields(Hardware)}
    entry = {"name": path.stem, "source": str(path), "kind": "cuda", **entry}
    for key, value in entry.items():
        if key not in known:
            raise ValueError(f"--hardware {path}: unknown field {key!r}; the fields are "
                             f"{', '.join(known)}")
        number = known[key].type in ("float", "int")
        if number and (isinstance(value, bool) or not isinstance(value, (int, float))
                       or value < 0):
            raise ValueError(f"--hardware {path}: {key}: {value!r} is not a number >= 0")
    missing = [k for k, f in known.items() if k not in entry and f.default is MISSING]
    if missing:
        raise ValueError(f"--hardware {path}: missing {', '.join(missing)}")
    if entry["kind"] not in ("cuda", "xla", "cpu"):
        raise ValueError(f"--hardware {path}: kind: {entry['kind']!r}; one of cuda, xla, cpu")
    return Hardware(**entry)


@functools.cache
def this_cpu() -> Hardware:
    """This machine as one device, each figure the best of a few timed runs (about two
    seconds in all): float32 matmul FLOP/s (2048-square: smaller ones miss this CPU's peak),
    copy bandwidth, and the host's time per operation of a module's forward and backward,
    memory the machine's."""
    import os

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2 * n**3 / _best_time(lambda: a @ b, repeats=10)
    big = torch.empty(64 * 2**20 // 4)
    other = torch.empty_like(big)
    bandwidth = max(2 * big.nbytes / _best_time(lambda: other.copy_(big)) for _ in range(3))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", float(memory), flops, flops, bandwidth, bandwidth, bandwidth, 1,
                    "cpu", "timed on this machine (float32 matmul, copy, dispatch)",
                    op_overhead=_dispatch_seconds())


def _dispatch_seconds() -> float:
    """Seconds per operation of a forward and backward through tiny modules, where the
    host's work (Python, dispatch, autograd) is all there is."""
    from .cost import OpCosts

    net = torch.nn.Sequential(*[m for _ in range(20) for m in (
        torch.nn.Linear(8, 8), torch.nn.SiLU(), torch.nn.LayerNorm(8))])
    x = torch.ones(4, 8)

    def step() -> None:
        net(x).sum().backward()
    with OpCosts() as costs:
        step()
    return min(_best_time(step) for _ in range(3)) / len(costs.ops)


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best

