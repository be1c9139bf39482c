"""FSDP2 (`fully_shard`) for torch.distributed runs: each decoder layer, then the root.

The model definition stays plain Hugging Face; this only wraps it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Shard

from ..config import DTYPES, DPOConfig
from ..models.lora import is_quantized
from .backend import Backend
from .layers import decoder_layers
from .single import torch_refusals
from .strategy import Strategy


class FSDP2(Strategy):
    """torchrun's processes, every weight sharded over all of them by FSDP2 (or, with
    `parallel.replicate`, HSDP: within groups of ranks, replicated across): each decoder
    layer, then the root; compute in the role's dtype, gradients reduced in float32. The
    reference is sharded the same way and never trained (optionally kept in host memory
    between uses)."""

    name = "fsdp2"
    sharded = True

    def __init__(self, cfg: DPOConfig, backend: Backend) -> None:
        super().__init__(cfg, backend)
        # Made here, where every rank constructs the strategy together, and kept by it:
        # policy and reference share the mesh, and one process can hold several strategies
        # in turn over different process groups (the planner's fake ones).
        self._mesh = dense_mesh(backend.device.type, cfg.parallel.replicate, backend.world_size)

    @classmethod
    def applies(cls, kind: str, world: int, cfg: DPOConfig) -> bool:
        return kind != "xla" and world > 1

    @classmethod
    def refusals(cls, cfg: DPOConfig, kind: str, world: int) -> Iterator[str]:
        yield from torch_refusals(cfg, kind)
        replicate = cfg.parallel.replicate
        if world % replicate:
            yield (f"parallel.replicate={replicate}: must divide the {world} processes of the "
                   "run (torchrun --nproc_per_node x nodes); use the number of nodes")
        if is_quantized(cfg.model):
            yield ("model.lora.quantize=4bit under torchrun: FSDP2 cannot shard bitsandbytes' "
                   "4-bit weights; run QLoRA as one process (one GPU), or plain LoRA "
                   "(model.lora.quantize=null) on several")

    @classmethod
    def meta_init(cls, cfg: DPOConfig) -> bool:
        return True

    def describe(self, policy: torch.nn.Module) -> list[str]:
        world, replicate = self.backend.world_size, self.cfg.parallel.replicate
        if replicate == 1:
            return [f"FSDP2: every weight sharded over the {world} ranks"]
        return [f"HSDP: every weight sharded over the {world // replicate} ranks of each of "
                f"{replicate} groups (replicate {replicate} x shard {world // replicate}), "
                "replicated across the groups"]

    def mesh(self) -> DeviceMesh:
        """FSDP2's mesh of the dense weights: all ranks (FSDP2's default) or, with
        `parallel.replicate=R`, (replicate R, shard world / R), consecutive ranks in one
        shard group."""
        return self._mesh

    def shard(self, model: torch.nn.Module, role: str) -> torch.nn.Module:
        """Works on a meta-device model too (materialise it afterwards)."""
        model = super().shard(model, role)
        m = self.cfg.model
        dtype = m.policy_dtype if role == "policy" else m.reference_dtype
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
        # Pinned host memory speeds the copies to a GPU; without one there is nothing to pin.
        offload = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
                   if role == "reference" and self.cfg.reference.cpu_offload
                   else OffloadPolicy())
        kwargs = dict(mp_policy=policy, offload_policy=offload, mesh=self.mesh(),
                      shard_placement_fn=partial(even_placement, self.mesh().size(-1)))
        self.shard_first(model, kwargs)
        for layer in decoder_layers(model, self.cfg):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def shard_first(self, model: torch.nn.Module, fsdp_kwargs: dict) -> None:
        """Parts a subclass shards its own way before the layers (which then skip them)."""

    def fill(self, model: torch.nn.Module, full_state: dict[str, torch.Tensor] | None) -> None:
        load_from_rank0(model, full_state)


def even_placement(shards: int, param: torch.nn.Parameter) -> Shard:
    """FSDP2 shards dim 0 by default: an [E, ...] stack of E experts over more ranks than E
    would put a whole expert on each of the first E ranks and nothing on the rest (on 256
    ranks, 8 experts of Mixtral: rank 0 holds 1/8 of every layer's experts). Such a tensor is
    sharded along its largest dimension instead. Of a DTensor (experts already split over an
    EP mesh) FSDP2 shards the local part: its shape decides."""
    shape = param.to_local().shape if isinstance(param, DTensor) else param.shape
    if len(shape) < 2 or shape[0] >= shards:
        return Shard(0)
    return Shard(max(range(len(shape)), key=lambda d: shape[d]))


def dense_mesh(device_type: str, replicate: int, world: int) -> DeviceMesh:
    if replicate == 1:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, world // replicate),
                            mesh_dim_names=("replicate", "shard"))


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
