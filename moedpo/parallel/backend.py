"""Backend: the device of this process and its place among the others.

Scale-out rides on existing launchers: `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK and
moedpo joins the process group it describes (nccl on GPUs, gloo on CPUs); a plain
`python run_dpo_no_trainer.py` is one process. On XLA (TPU pods) there is one process per
host, and SPMD makes all devices of the slice look like one: every host builds the same
global batch and the compiler splits it (see parallel/spmd.py). How the models spread over
the processes and devices is the strategy's (parallel/strategy.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .host_memory import huge_pages_for_large_tensors, keep_freed_host_memory

log = logging.getLogger("moedpo")
BACKENDS = ("auto", "cpu", "cuda", "xla")


@dataclass(frozen=True)
class Backend:
    kind: str  # cpu | cuda | xla
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    devices: int = 1  # devices one forward's batch is split over (XLA SPMD: all of them)
    host: int = 0  # XLA: this host's index; only host 0 writes
    hosts: int = 1  # XLA: processes (one per host), joined by a gloo group when > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def total_devices(self) -> int:
        """Devices the global batch is spread over (processes x devices per process)."""
        return self.world_size * self.devices

    @property
    def process(self) -> int:
        """This process's index among all of them: torchrun rank, or XLA host."""
        return self.rank if self.kind != "xla" else self.host

    @property
    def is_main(self) -> bool:
        return self.rank == 0 and self.host == 0

    def sync(self) -> None:
        """XLA: cut the traced graph here and run it; elsewhere nothing."""
        if self.kind == "xla":
            import torch_xla

            torch_xla.sync()

    def barrier(self) -> None:
        if self.distributed or self.hosts > 1:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (float64 on the CPU for metrics: exact enough, backend-neutral)."""
        if not self.distributed:
            return values
        reduced = values.to(self.device, torch.float64 if self.kind == "cpu" else torch.float32)
        dist.all_reduce(reduced)
        return reduced.cpu().double()

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """A small tensor summed over ranks where it lives, with no host read (a batch
        statistic inside the step, such as KTO's z0); itself in one process."""
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values

    def peak_memory(self) -> int:
        """The most bytes this process has held so far: the CUDA allocator's peak, the XLA
        runtime's peak on this host's first device, or on the CPU (and XLA's CPU devices,
        whose runtime keeps no allocator statistics) the process's peak resident memory,
        the Python runtime and libraries included."""
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.kind == "xla":
            import torch_xla.core.xla_model as xm

            try:
                info = xm.get_memory_info(self.device)
                return int(info.get("peak_bytes_used", info.get("bytes_used", 0)))
            except RuntimeError:  # "GetAllocatorStats is not supported" (PJRT_DEVICE=CPU)
                pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def union(self, names: list[str]) -> list[str]:
        """Every rank's `names` together, sorted: what a reduce by name must cover when some
        ranks hold names others lack (a rank with no eval pair has no metric at all)."""
        if not self.distributed:
            return sorted(set(names))
        gathered: list[list[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(set(names)))
        return sorted(set().union(*gathered))


def choose_kind(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("PJRT_DEVICE"):
        try:
            import torch_xla  # noqa: F401

            return "xla"
        except ImportError:
            pass
    return "cuda" if torch.cuda.is_available() else "cpu"


def launched_processes() -> int:
    """How many processes torchrun launched this run with (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_xla(compile_cache: str | None = None, full_precision: bool = False) -> Backend:
    import torch_xla
    import torch_xla.runtime as xr

    xr.use_spmd()  # before any XLA tensor exists
    if compile_cache:
        xr.initialize_cache(compile_cache, readonly=False)
    if full_precision:  # TPUs otherwise run float32 matmuls in bfloat16 passes
        import torch_xla.backends

        torch_xla.backends.set_mat_mul_precision("highest")
    hosts = xr.process_count()
    if hosts > 1 and not dist.is_initialized():
        # Hosts agree on checkpoint plans (DCP) and barriers over gloo; torch_xla's xla://
        # rendezvous takes the addresses from its own runtime, no launcher needed.
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers xla://)

        dist.init_process_group("gloo", init_method="xla://")
    return Backend("xla", torch_xla.device(), devices=xr.global_runtime_device_count(),
                   host=xr.process_index(), hosts=hosts)


def init_backend(requested: str = "auto", compile_cache: str | None = None,
                 full_precision: bool = False) -> Backend:
    """The run's backend (validate.check_placement has refused what it cannot run); the
    strategy (parallel/__init__.py) then decides how models and batches spread over it."""
    kind = choose_kind(requested)
    if kind == "xla":
        return init_xla(compile_cache, full_precision)
    world = launched_processes()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        keep_freed_host_memory()  # activations and gradients live in host memory
        huge_pages_for_large_tensors()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return Backend(kind, device, rank, world, local_rank)


def shutdown(backend: Backend) -> None:
    if backend.distributed and dist.is_initialized():
        dist.destroy_process_group()
