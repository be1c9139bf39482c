"""Backend: the device of this process and its place among the others.

Scale-out rides on existing launchers: `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK and
moedpo joins the process group it describes (nccl on GPUs, gloo on CPUs); a plain
`python run_dpo_no_trainer.py` is one process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("moedpo")
BACKENDS = ("auto", "cpu", "cuda", "xla")


@dataclass(frozen=True)
class Backend:
    kind: str  # cpu | cuda | xla
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (float64 on the CPU for metrics: exact enough, backend-neutral)."""
        if not self.distributed:
            return values
        reduced = values.to(self.device, torch.float64 if self.kind == "cpu" else torch.float32)
        dist.all_reduce(reduced)
        return reduced.cpu().double()


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


def init_backend(requested: str = "auto") -> Backend:
    kind = choose_kind(requested)
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.backend=cuda but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return Backend(kind, device, rank, world, local_rank)


def shutdown(backend: Backend) -> None:
    if backend.distributed and dist.is_initialized():
        dist.destroy_process_group()
