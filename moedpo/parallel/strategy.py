"""The one interface every way of spreading a run over devices implements.

A strategy answers, for one run: which configs it cannot run (before anything loads), how
the policy and the reference are sharded, how starting weights reach a sharded model, how a
batch is placed, which planners read and write its checkpoints, which gradient reductions it
adds after the backward, and what it adds to the step's metrics. `placement.py`, the trainer
and the checkpoints ask it; none of them knows which strategy runs. The implementations live
in their own modules (single.py, fsdp.py, expert.py, spmd.py) and `parallel/__init__.py` is
the registry that picks one; a new parallelism is a new module and one line there.

Metrics are summed over processes by the backend (`Backend.all_reduce_sum`): every strategy
so far gives each process its own pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from ..config import DPOConfig
from .backend import Backend
from .layers import checkpoint_decoder_layers, compile_decoder_layers


class Strategy:
    """One process's share of the work. Subclasses set `name` and override what differs;
    the defaults are one process holding whole models on its own device."""

    name: ClassVar[str] = ""

    @classmethod
    def applies(cls, kind: str, world: int, cfg: DPOConfig) -> bool:
        """Whether this strategy runs a `kind` backend with torchrun's `world` processes."""
        raise NotImplementedError

    @classmethod
    def refusals(cls, cfg: DPOConfig, kind: str, world: int) -> Iterator[str]:
        """One-line reasons this strategy cannot run `cfg` (validate raises the first),
        decided from the config alone, before any model loads."""
        yield from ()

    @classmethod
    def meta_init(cls, cfg: DPOConfig) -> bool:
        """Whether the models are built weightless by default (`model.meta_init=null`):
        where they end up sharded, each process then fills only its shards."""
        return False

    def __init__(self, cfg: DPOConfig, backend: Backend) -> None:
        self.cfg, self.backend = cfg, backend

    def describe(self, policy: torch.nn.Module) -> list[str]:
        """Lines for the startup log (the mesh, what each device holds of `policy`)."""
        return []

    # ---- the models
    # SPMD annotates tensors already on the device: meta-built models get (empty) storage
    # there before `shard`; the other strategies allocate only their shards after it.
    storage_before_sharding: ClassVar[bool] = False
    # Whether the weights are spread over devices (then `xla_fsdp_grad_ckpt` applies).
    sharded: ClassVar[bool] = False

    def checkpoints_layers(self) -> bool:
        """Whether the policy's decoder layers are activation-checkpointed: as configured,
        else the original's `xla_fsdp_grad_ckpt`, which goes with sharding."""
        configured = self.cfg.model.activation_checkpointing
        if configured is not None:
            return configured
        return self.cfg.model.fsdp_config.xla_fsdp_grad_ckpt and self.sharded

    def shard(self, model: torch.nn.Module, role: str) -> torch.nn.Module:
        """`model` (role "policy" or "reference") ready to run here: the policy's decoder
        layers checkpointed when configured, every decoder layer compiled when configured."""
        if role == "policy" and self.checkpoints_layers():
            checkpoint_decoder_layers(model, self.cfg.model.activation_checkpointing_every)
        if self.cfg.model.compile:
            compile_decoder_layers(model, self.cfg)
        return model

    def fill(self, model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None) -> None:
        """Starting weights into a sharded, materialised `model` from the full state dict
        that only the main process holds (None elsewhere)."""
        model.load_state_dict(full_state)

    # ---- the data
    def place(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated batch's device tensors as the models expect them."""
        return batch

    # ---- checkpoints (torch.distributed.checkpoint)
    def save_planner(self) -> Any:
        """DCP's planner for writing this strategy's tensors (None: DCP's default)."""
        return None

    def load_planner(self) -> Any:
        return None

    # ---- the step
    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """After the step's backward, before clipping: gradient reductions FSDP2 does not do
        itself (none by default)."""

    def step_metrics(self) -> dict[str, float]:
        """What this strategy adds to each step's metrics row."""
        return {}
