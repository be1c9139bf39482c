"""One process, whole models on its one device (CPU or a GPU): the strategy of a plain
`moedpo train` and of every laptop run."""

from __future__ import annotations

from collections.abc import Iterator

from ..config import DPOConfig
from .strategy import Strategy


class SingleProcess(Strategy):
    name = "single"

    @classmethod
    def applies(cls, kind: str, world: int, cfg: DPOConfig) -> bool:
        return kind != "xla" and world == 1

    @classmethod
    def refusals(cls, cfg: DPOConfig, kind: str, world: int) -> Iterator[str]:
        yield from torch_refusals(cfg, kind)
        ep = cfg.parallel.expert_parallel
        if ep > 1:
            yield (f"parallel.expert_parallel={ep} spreads the experts over torchrun's "
                   f"processes; this run has one ({kind}). Launch with `torchrun "
                   f"--nproc_per_node {ep} ...` or set parallel.expert_parallel=1")


def torch_refusals(cfg: DPOConfig, kind: str) -> Iterator[str]:
    """What no torch.distributed strategy (one process or FSDP2) runs."""
    if cfg.tensor_parallelism != 1:
        yield (f"tensor_parallelism={cfg.tensor_parallelism} needs the xla backend (this run "
               f"is on {kind}); torch.distributed runs shard with FSDP2 only: set it to 1")
