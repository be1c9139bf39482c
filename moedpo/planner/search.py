"""`moedpo plan --search`: which run to start. The configured run's variants on the same
devices, each planned as `moedpo plan` plans one (a traced step on fake tensors), the ones
that fit ranked by predicted pairs/s, each as a ready command line.

Searched: HSDP replica groups (`parallel.replicate`, on GPUs: shard groups of whole nodes),
expert parallelism (`parallel.expert_parallel`: off, or the most ranks of a node that divide
the experts and the shard group, for a dropless MoE under torchrun), the micro-batch
(`per_device_train_batch_size` with `gradient_accumulation_steps` keeping the pairs per
device and step) and activation checkpointing. Every variant trains on the same pairs per
step, so pairs/s compares them fairly.

Memory grows with the micro-batch, so each (replicate, expert parallel, checkpointing)
series climbs the sizes in waves and stops at the first that does not fit; checkpointing,
which only trades compute for memory, is tried only above the largest size that fits
without it. Each trace runs in a fresh process (trace.tracing_pool), two at a time.
"""

from __future__ import annotations

import concurrent.futures
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..config import DPOConfig
from . import Plan, assemble
from .hardware import Hardware
from .trace import TracedStep, step_parts, traced_alone, tracing_pool

# Levers a demanding user would also try, and why the search leaves them as configured.
NOT_SEARCHED = (
    "parallel.expert_parallel degrees other than off and the most in a node",
    "model.lora.r (LoRA trains other weights than the full run: plan it by setting it)",
    "reference.precompute (its reference pass before training is not traced yet; "
    "plan it by setting it)",
)


@dataclass
class Candidate:
    """One variant of the run: the overrides it changes, and its plan once traced."""

    changes: dict[str, Any]
    plan: Plan | None = None

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits

    def command(self, overrides: list[str], devices: int, hw: Hardware) -> str:
        """The ready command line: the user's overrides with this variant's changes."""
        keys = {k.lstrip("+") for k in self.changes}
        kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+") not in keys]
        mine = [f"{k}={_value(v)}" for k, v in self.changes.items()]
        args = " ".join(shlex.quote(a) for a in (*kept, *mine))
        if hw.kind == "xla":
            return f"moedpo train parallel.backend=xla {args}"
        if devices == 1:
            return f"moedpo train {args}"
        nodes = max(1, devices // hw.devices_per_node)
        per_node = devices // nodes
        launch = ("torchrun --standalone" if nodes == 1 else
                  f"torchrun --nnodes {nodes} --rdzv-backend c10d --rdzv-endpoint $HEAD:29500")
        return f"{launch} --nproc_per_node {per_node} --no-python moedpo train {args}"


def _value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def replica_counts(devices: int, hw: Hardware) -> list[int]:
    """1 (FSDP2 over every device) and, on GPUs, each R whose shard groups are whole nodes
    (8, 16, ... devices) with more than one group: the gathers stay inside a group."""
    if hw.kind == "xla":  # one flat SPMD mesh: no replica groups yet
        return [1]
    counts = [1]
    shard = hw.devices_per_node
    while shard < devices:
        if devices % shard == 0:
            counts.append(devices // shard)
        shard *= 2
    return counts


def expert_parallel_degrees(cfg: DPOConfig, devices: int, replicas: int,
                            hw: Hardware) -> list[int]:
    """1 and, for a dropless MoE under torchrun, the largest EP degree inside one node that
    divides the expert count and the shard group (devices / replicas)."""
    from ..models.load import model_config
    from ..validate import EXPERT_COUNT_FIELDS

    config = model_config(cfg.model)
    experts = next((getattr(config, k) for k in EXPERT_COUNT_FIELDS
                    if getattr(config, k, None)), None)
    dropped = cfg.model.capacity_factor > 0 or cfg.model.moe_implementation == "dropped"
    if not experts or dropped or hw.kind == "xla":
        return [1]
    shard = devices // replicas
    fitting = [e for e in range(2, min(hw.devices_per_node, shard) + 1)
               if experts % e == 0 and shard % e == 0]
    return [1, max(fitting)] if fitting else [1]


def micro_batch_sizes(pairs: int) -> list[int]:
    """Sizes that divide the pairs per device and step: the powers of two and `pairs`."""
    sizes = {b for b in (2**i for i in range(pairs.bit_length())) if pairs % b == 0}
    return sorted(sizes | {pairs})


def variant(cfg: DPOConfig, changes: dict[str, Any]) -> DPOConfig:
    """`cfg` with the searched keys set (the keys `Candidate.changes` holds)."""
    return replace(
        cfg, per_device_train_batch_size=changes["per_device_train_batch_size"],
        gradient_accumulation_steps=changes["gradient_accumulation_steps"],
        model=replace(cfg.model,
                      activation_checkpointing=changes["model.activation_checkpointing"]),
        parallel=replace(cfg.parallel, replicate=changes["parallel.replicate"],
                         expert_parallel=changes["parallel.expert_parallel"]))


def search(cfg: DPOConfig, devices: int, hw: Hardware, routing_skew: float, margin: float,
           progress: Callable[[Candidate], None] | None = None,
           trace: Callable[[DPOConfig, int, float], TracedStep] = traced_alone,
           executor: concurrent.futures.Executor | None = None) -> list[Candidate]:
    """Every variant traced (by `trace`, in `executor`: by default each in a fresh process,
    two at a time), best first: those that fit by pairs/s, then the rest."""
    pairs = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    sizes = micro_batch_sizes(pairs)

    def candidate(series: tuple[int, int], checkpointing: bool, size: int) -> Candidate:
        return Candidate({"parallel.replicate": series[0],
                          "parallel.expert_parallel": series[1],
                          "per_device_train_batch_size": size,
                          "gradient_accumulation_steps": pairs // size,
                          "model.activation_checkpointing": checkpointing})

    traced: list[Candidate] = []
    with executor or tracing_pool(2) as pool:

        def wave(batch: list[Candidate]) -> None:
            jobs = []
            for c in batch:
                parts, combine = step_parts(variant(cfg, c.changes))
                jobs.append((c, combine, [pool.submit(trace, part, devices, routing_skew)
                                          for part in parts]))
            for c, combine, futures in jobs:
                step = combine([f.result() for f in futures])
                c.plan = assemble(variant(cfg, c.changes), devices, hw, step, routing_skew,
                                  margin)
                traced.append(c)
                if progress:
                    progress(c)

        every = [(r, e) for r in replica_counts(devices, hw)
                 for e in expert_parallel_degrees(cfg, devices, r, hw)]

        def series(c: Candidate) -> tuple[int, int]:
            return c.changes["parallel.replicate"], c.changes["parallel.expert_parallel"]

        for checkpointing in (False, True):
            # each series starts above the largest size that fit without checkpointing (all
            # sizes without it), and climbs until a size does not fit
            start = dict.fromkeys(every, 0)
            if checkpointing:
                for s in every:
                    fitted = [c.changes["per_device_train_batch_size"] for c in traced
                              if c.fits and series(c) == s]
                    start[s] = sizes.index(max(fitted)) + 1 if fitted else 0
            climbing = {s: i for s, i in start.items() if i < len(sizes)}
            while climbing:
                batch = [candidate(s, checkpointing, sizes[i]) for s, i in climbing.items()]
                wave(batch)
                climbing = {series(c): climbing[series(c)] + 1 for c in batch
                            if c.fits and climbing[series(c)] + 1 < len(sizes)}
    return sorted(traced, key=lambda c: (not c.fits, -c.plan.pairs_per_second))
