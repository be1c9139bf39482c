"""Where the run executes: the backend (cpu / cuda / xla, this process's place among the
others, backend.py) and the strategy that spreads the models and batches over the devices
(strategy.py's interface; one module each: single.py, fsdp.py, expert.py, spmd.py).

This is the registry: the first strategy in `STRATEGIES` that applies to the backend and
torchrun's process count runs. A new parallelism is its module and one entry here.
"""

from __future__ import annotations

from ..config import DPOConfig
from .backend import Backend
from .expert import ExpertParallel
from .fsdp import FSDP2
from .single import SingleProcess
from .spmd import SPMD
from .strategy import Strategy

# Most specific first: expert parallelism is FSDP2 with the experts apart.
STRATEGIES: tuple[type[Strategy], ...] = (SPMD, ExpertParallel, FSDP2, SingleProcess)


def strategy_class(kind: str, world: int, cfg: DPOConfig) -> type[Strategy]:
    """The strategy a `kind` backend with torchrun's `world` processes runs `cfg` with."""
    return next(s for s in STRATEGIES if s.applies(kind, world, cfg))


def make_strategy(cfg: DPOConfig, backend: Backend) -> Strategy:
    """The run's strategy (validate.check_placement has asked it what it refuses)."""
    return strategy_class(backend.kind, backend.world_size, cfg)(cfg, backend)


__all__ = ["STRATEGIES", "Strategy", "make_strategy", "strategy_class"]
