"""What is applied to a plain model's decoder layers before sharding: which layers they are,
activation checkpointing on CPU and CUDA, and torch.compile. XLA checkpoints with torch_xla's
own checkpoint instead (parallel/spmd.py) and compiles the whole step anyway."""

from __future__ import annotations

import torch

from ..config import ConfigError, DPOConfig
from ..private_api import no_split_modules


def layer_classes(model: torch.nn.Module, cfg: DPOConfig) -> set[str]:
    """`model.fsdp_config.transformer_layer_cls_to_wrap`, else the model's own decoder layer."""
    names = cfg.model.fsdp_config.transformer_layer_cls_to_wrap
    return set(names or no_split_modules(model))


def decoder_layers(model: torch.nn.Module, cfg: DPOConfig) -> list[torch.nn.Module]:
    classes = layer_classes(model, cfg)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ConfigError(f"model.fsdp_config.transformer_layer_cls_to_wrap={sorted(classes)}: "
                          f"no such layer in {type(model).__name__}")
    return layers


def checkpoint_decoder_layers(model: torch.nn.Module, every: int = 1) -> None:
    """Keep only each checkpointed layer's input for the backward and run its forward again
    there; every `every`-th decoder layer (1: all of them). transformers' own per-layer
    checkpointing, non-reentrant, so FSDP2's hooks stay outside the recomputed region."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"model.activation_checkpointing=true: {type(model).__name__} does "
                          "not support activation checkpointing; set it to false")
    model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)


def compile_decoder_layers(model: torch.nn.Module, cfg: DPOConfig) -> None:
    """torch.compile each decoder layer in place (names and state dict unchanged), as
    torchtitan does per block: one graph per layer type, reused by every layer. Graph breaks
    are allowed: the dropless MoE reads its per-expert counts on the host."""
    for layer in decoder_layers(model, cfg):
        layer.compile()
