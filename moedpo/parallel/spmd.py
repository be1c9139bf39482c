"""torch_xla SPMD (TPU pods; also the CPU, for tests): one process per host drives every
device of the slice as one, and the XLA compiler (GSPMD) partitions the program from
sharding annotations.

Mesh `(N / tp, tp)` with axes ("fsdp", "tensor"). Every weight gets a partition spec from
the original trainer's 2-D table; at tp = 1 the "tensor" axis has one device, so the same
table is plain FSDP (every large weight split over all devices on one dimension). Inputs and
logits are split on "fsdp" along the batch.

With expert parallelism (`parallel.expert_parallel=ep`) the mesh is `(N / (ep tp), ep, tp)`
with axes ("fsdp", "expert", "tensor"): the batch and every dense weight's "fsdp" dimension
are split over ("fsdp", "expert") together, so the dense parts shard as before; the stacked
expert weights are split on E over "expert" (and on H over "fsdp"), and so is the static
[E, rows, H] buffer of the dropped and dense experts. The partitioner then moves the tokens
from the batch's split to the experts' (an all-to-all) instead of gathering the experts.

Decoder layers are activation-checkpointed with
torch_xla's own checkpoint (torch.utils.checkpoint's recompute is merged away by XLA's
common-subexpression elimination).

torch_xla is imported lazily: this module is only loaded on the xla backend.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, DPOConfig
from ..models.lora import is_enabled as lora_enabled
from .backend import Backend
from .expert import check_expert_count, expert_line
from .layers import layer_classes
from .strategy import Strategy

log = logging.getLogger("moedpo")
AXES = ("fsdp", "tensor")
EP_AXES = ("fsdp", "expert", "tensor")

# (parameter name pattern, partition spec). Weights are [out, in] for linears; the fused
# experts are [E, 2I, H] (gate_up, the original's w1/w3) and [E, H, I] (down, w2).
PARTITION_TABLE: list[tuple[str, tuple]] = [
    (r"(embed_tokens|embed_in|wte)\.weight$", ("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|query_key_value)\.weight$", ("tensor", "fsdp")),
    (r"(o_proj|attention\.dense)\.weight$", ("fsdp", "tensor")),
    (r"experts\.gate_up_proj$", (None, "tensor", "fsdp")),
    (r"experts\.down_proj$", (None, "fsdp", "tensor")),
    (r"(gate_proj|up_proj|dense_h_to_4h)\.weight$", ("tensor", "fsdp")),
    (r"(down_proj|dense_4h_to_h)\.weight$", ("fsdp", "tensor")),
    (r"(lm_head|embed_out)\.weight$", ("tensor", "fsdp")),
]


def make_mesh(tensor_parallelism: int, expert_parallel: int = 1):
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    devices = xr.global_runtime_device_count()
    if tensor_parallelism < 1 or devices % tensor_parallelism:
        raise ValueError(f"tensor_parallelism={tensor_parallelism} must divide the {devices} "
                         "XLA devices")
    if expert_parallel == 1:
        return xs.Mesh(np.arange(devices), (devices // tensor_parallelism, tensor_parallelism),
                       AXES)
    if devices % (expert_parallel * tensor_parallelism):
        raise ConfigError(f"parallel.expert_parallel={expert_parallel} x tensor_parallelism="
                          f"{tensor_parallelism} must divide the {devices} XLA devices")
    shape = (devices // (expert_parallel * tensor_parallelism), expert_parallel,
             tensor_parallelism)
    return xs.Mesh(np.arange(devices), shape, EP_AXES)


def data_axes(mesh) -> str | tuple[str, str]:
    """The axis (or axes) the batch and the dense weights' "fsdp" dimension are split on."""
    return ("fsdp", "expert") if "expert" in mesh.axis_names else "fsdp"


def partition_spec(name: str, param: torch.Tensor, mesh=None) -> tuple | None:
    """The table's spec for a weight; norms, biases and routers stay replicated (None).
    On an expert-parallel mesh the stacked experts split E over "expert", and the other
    weights' "fsdp" dimension spans ("fsdp", "expert")."""
    if param.dim() < 2 or name.endswith("mlp.gate.weight") or ".router." in name:
        return None
    experts_axis = mesh is not None and "expert" in mesh.axis_names
    data = data_axes(mesh) if mesh is not None else "fsdp"
    for pattern, spec in PARTITION_TABLE:
        if re.search(pattern, name):
            if len(spec) != param.dim():
                return None
            if experts_axis and pattern.startswith(r"experts\."):
                return ("expert",) + spec[1:]
            return tuple(data if axis == "fsdp" else axis for axis in spec)
    # A weight the table does not know: split its largest dimension over "fsdp".
    spec = [None] * param.dim()
    spec[int(np.argmax(param.shape))] = data
    return tuple(spec)


def shard_model(model: torch.nn.Module, mesh, layer_classes: set[str],
                checkpoint_every: int = 0) -> torch.nn.Module:
    """Annotate `model` (already on the XLA device) for SPMD: weights by the table, logits on
    "fsdp", every `checkpoint_every`-th decoder layer checkpointed (0: none)."""
    import torch_xla.distributed.spmd as xs
    from torch_xla.distributed.fsdp import checkpoint_module

    for name, param in model.named_parameters():
        spec = partition_spec(name, param, mesh)
        if spec is not None:
            xs.mark_sharding(param, mesh, spec)
    if "expert" in mesh.axis_names:
        from ..models.moe import experts_modules

        def shard_buffer(buffer: torch.Tensor) -> torch.Tensor:  # [E, rows, H]
            xs.mark_sharding(buffer, mesh, ("expert", "fsdp", None))
            return buffer

        for experts in experts_modules(model):
            experts.moedpo_shard_buffer = shard_buffer
    if checkpoint_every:
        layers = [(parent, name, child) for parent in model.modules()
                  for name, child in parent.named_children()
                  if type(child).__name__ in layer_classes]
        for parent, name, child in layers[::checkpoint_every]:
            parent.register_module(name, checkpoint_module(child))

    def shard_logits(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        xs.mark_sharding(output, mesh, (data_axes(mesh),) + (None,) * (output.dim() - 1))
        return output

    model.get_output_embeddings().register_forward_hook(shard_logits)
    return model


def shard_batch(batch: dict[str, torch.Tensor], mesh) -> dict[str, torch.Tensor]:
    """Split each input over "fsdp" (and "expert") along its rows."""
    import torch_xla.distributed.spmd as xs

    for tensor in batch.values():
        xs.mark_sharding(tensor, mesh, (data_axes(mesh),) + (None,) * (tensor.dim() - 1))
    return batch


def compile_count() -> int:
    """XLA graphs compiled so far by this process (torch_xla's own counter)."""
    import torch_xla.debug.metrics as met

    return int(met.counter_value("UncachedCompile") or 0)


class SPMD(Strategy):
    """The xla backend: one process per host, every device of the slice one SPMD program
    over the mesh above."""

    name = "spmd"
    sharded = True
    storage_before_sharding = True

    @classmethod
    def applies(cls, kind: str, world: int, cfg: DPOConfig) -> bool:
        return kind == "xla"

    @classmethod
    def refusals(cls, cfg: DPOConfig, kind: str, world: int) -> Iterator[str]:
        m = cfg.model
        if m.meta_init and not cfg.checkpoint_manager_path:
            yield ("model.meta_init=true on XLA reads the weights shard by shard from "
                   "checkpoint_manager_path; set it (`moedpo convert` makes one from a Hugging "
                   "Face folder) or set model.meta_init=false")
        if lora_enabled(m):
            yield ("model.lora.r > 0 on XLA: PEFT's adapters (and its expert parametrizations) "
                   "have no SPMD sharding annotations here yet; set model.lora.r=0, or train "
                   "LoRA on CPU/CUDA")
        if m.compile:
            yield ("model.compile=true: on XLA every step is compiled whole already; set "
                   "model.compile=false")
        if m.moe_implementation == "dropless":
            yield ("model.moe_implementation=dropless has data-dependent shapes, which XLA "
                   "recompiles every step; use dense, or dropped with model.capacity_factor > 0 "
                   "(or auto)")

    @classmethod
    def meta_init(cls, cfg: DPOConfig) -> bool:
        """Only where the weights come from `checkpoint_manager_path`, read shard by shard
        (XLA has no broadcast of one host's weights into the shards)."""
        return bool(cfg.checkpoint_manager_path)

    def __init__(self, cfg: DPOConfig, backend: Backend) -> None:
        super().__init__(cfg, backend)
        self.mesh = make_mesh(cfg.tensor_parallelism, cfg.parallel.expert_parallel)

    def describe(self, policy: torch.nn.Module) -> list[str]:
        lines = [f"SPMD mesh {tuple(self.mesh.mesh_shape)} over axes {self.mesh.axis_names}"]
        ep = self.cfg.parallel.expert_parallel
        if ep > 1:
            lines.append(expert_line(policy, self.backend.total_devices, ep, "device"))
        return lines

    def shard(self, model: torch.nn.Module, role: str) -> torch.nn.Module:
        """Partition specs by the table; the policy's layers checkpointed with torch_xla's
        own checkpoint."""
        if self.cfg.parallel.expert_parallel > 1:
            check_expert_count(model, self.cfg.parallel.expert_parallel)
        every = (self.cfg.model.activation_checkpointing_every
                 if role == "policy" and self.checkpoints_layers() else 0)
        return shard_model(model, self.mesh, layer_classes(model, self.cfg), every)

    def place(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return shard_batch(batch, self.mesh)

    def save_planner(self) -> Any:
        """torch_xla's planners for SPMD-sharded tensors: each host its devices' shards."""
        from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

        return SPMDSavePlanner()

    def load_planner(self) -> Any:
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

        return SPMDLoadPlanner()

    def step_metrics(self) -> dict[str, float]:
        """Graphs compiled so far: flat after warm-up, one graph per step shape."""
        return {"xla_compiles": compile_count()}
