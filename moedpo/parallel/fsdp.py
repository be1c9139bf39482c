"""FSDP2 (`fully_shard`) for torch.distributed runs: each decoder layer, then the root.

The model definition stays plain Hugging Face; this only wraps it. The reference model is
sharded the same way and never trained.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..config import DTYPES, DPOConfig


def layer_classes(model: torch.nn.Module, cfg: DPOConfig) -> set[str]:
    """`model.fsdp_config.transformer_layer_cls_to_wrap`, else the model's own decoder layer."""
    names = cfg.model.fsdp_config.transformer_layer_cls_to_wrap
    return set(names or getattr(model, "_no_split_modules", None) or [])


def shard(model: torch.nn.Module, cfg: DPOConfig, compute_dtype: str,
          checkpoint_layers: bool = False) -> torch.nn.Module:
    """fully_shard every decoder layer and the root; compute in `compute_dtype`, reduce
    gradients in float32."""
    classes = layer_classes(model, cfg)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"model.fsdp_config.transformer_layer_cls_to_wrap={sorted(classes)}: "
                         f"no such layer in {type(model).__name__}")
    if checkpoint_layers and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[compute_dtype], reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model
