"""Activation checkpointing of the decoder layers on CPU and CUDA (single process or FSDP2):
transformers' own per-layer checkpointing, non-reentrant, so FSDP2's hooks stay outside the
recomputed region. XLA uses torch_xla's checkpoint instead (parallel/spmd.py)."""

from __future__ import annotations

import torch

from ..config import ConfigError


def checkpoint_decoder_layers(model: torch.nn.Module, every: int = 1) -> None:
    """Keep only each checkpointed layer's input for the backward and run its forward again
    there; every `every`-th decoder layer (1: all of them)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.activation_checkpointing=true: {type(model).__name__} does "
                          "not support activation checkpointing; set it to false")
    model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)
