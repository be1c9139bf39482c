"""FSDP2 (`fully_shard`) for torch.distributed runs: each decoder layer, then the root.

The model definition stays plain Hugging Face; this only wraps it. The reference model is
sharded the same way and never trained (optionally kept in host memory between uses).
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from ..config import DTYPES, DPOConfig
from . import expert
from .layers import decoder_layers


def shard(model: torch.nn.Module, cfg: DPOConfig, compute_dtype: str,
          cpu_offload: bool = False) -> torch.nn.Module:
    """fully_shard every decoder layer and the root; compute in `compute_dtype`, reduce
    gradients in float32. Works on a meta-device model too (materialise it afterwards)."""
    layers = decoder_layers(model, cfg)
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[compute_dtype], reduce_dtype=torch.float32)
    # Pinned host memory speeds the copies to a GPU; without one there is nothing to pin.
    offload = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
               else OffloadPolicy())
    if cfg.parallel.expert_parallel > 1:  # the experts first: the layers skip them then
        device = "cuda" if torch.cuda.is_available() else "cpu"
        expert.shard_experts(model, expert.expert_mesh(device, cfg.parallel.expert_parallel),
                             dict(mp_policy=policy, offload_policy=offload))
    for layer in layers:
        fully_shard(layer, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mp_policy=policy, offload_policy=offload)
    return model


def load_from_rank0(model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None) -> None:
    """Fill every rank's shards of a sharded `model` from the unsharded state dict that only
    rank 0 holds (`None` elsewhere): one full copy of the weights in the whole job."""
    # A copy: the call puts the sharded values back into the dict it is given.
    set_model_state_dict(model, dict(full_state or {}), options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=True))


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP2 module's registered parameters back to their sharded DTensors. A module
    whose forward ran without a backward (the root of the no-grad reference) keeps its
    unsharded ones until its next forward; code that pairs two models' parameters shard by
    shard (reference_sync) needs both sharded. A no-op on a model FSDP2 did not wrap."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
