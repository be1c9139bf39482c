"""torch_xla SPMD (TPU pods; also the CPU, for tests): one process per host drives every
device of the slice as one, and the XLA compiler (GSPMD) partitions the program from
sharding annotations.

Mesh `(N / tp, tp)` with axes ("fsdp", "tensor"). Every weight gets a partition spec from
the original trainer's 2-D table; at tp = 1 the "tensor" axis has one device, so the same
table is plain FSDP (every large weight split over all devices on one dimension). Inputs and
logits are split on "fsdp" along the batch. Decoder layers are activation-checkpointed with
torch_xla's own checkpoint (torch.utils.checkpoint's recompute is merged away by XLA's
common-subexpression elimination).

torch_xla is imported lazily: this module is only loaded on the xla backend.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

log = logging.getLogger("moedpo")
AXES = ("fsdp", "tensor")

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


def make_mesh(tensor_parallelism: int):
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    devices = xr.global_runtime_device_count()
    if tensor_parallelism < 1 or devices % tensor_parallelism:
        raise ValueError(f"tensor_parallelism={tensor_parallelism} must divide the {devices} "
                         "XLA devices")
    return xs.Mesh(np.arange(devices), (devices // tensor_parallelism, tensor_parallelism),
                   AXES)


def partition_spec(name: str, param: torch.Tensor) -> tuple | None:
    """The table's spec for a weight; norms, biases and routers stay replicated (None)."""
    if param.dim() < 2 or name.endswith("mlp.gate.weight") or ".router." in name:
        return None
    for pattern, spec in PARTITION_TABLE:
        if re.search(pattern, name):
            return spec if len(spec) == param.dim() else None
    # A weight the table does not know: split its largest dimension over "fsdp".
    spec = [None] * param.dim()
    spec[int(np.argmax(param.shape))] = "fsdp"
    return tuple(spec)


def shard_model(model: torch.nn.Module, mesh, layer_classes: set[str],
                checkpoint_every: int = 0) -> torch.nn.Module:
    """Annotate `model` (already on the XLA device) for SPMD: weights by the table, logits on
    "fsdp", every `checkpoint_every`-th decoder layer checkpointed (0: none)."""
    import torch_xla.distributed.spmd as xs
    from torch_xla.distributed.fsdp import checkpoint_module

    for name, param in model.named_parameters():
        spec = partition_spec(name, param)
        if spec is not None:
            xs.mark_sharding(param, mesh, spec)
    if checkpoint_every:
        layers = [(parent, name, child) for parent in model.modules()
                  for name, child in parent.named_children()
                  if type(child).__name__ in layer_classes]
        for parent, name, child in layers[::checkpoint_every]:
            parent.register_module(name, checkpoint_module(child))

    def shard_logits(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
        xs.mark_sharding(output, mesh, ("fsdp",) + (None,) * (output.dim() - 1))
        return output

    model.get_output_embeddings().register_forward_hook(shard_logits)
    return model


def shard_batch(batch: dict[str, torch.Tensor], mesh) -> dict[str, torch.Tensor]:
    """Split each input over "fsdp" along its rows."""
    import torch_xla.distributed.spmd as xs

    for tensor in batch.values():
        xs.mark_sharding(tensor, mesh, ("fsdp",) + (None,) * (tensor.dim() - 1))
    return batch


def compile_count() -> int:
    """XLA graphs compiled so far by this process (torch_xla's own counter)."""
    import torch_xla.debug.metrics as met

    return int(met.counter_value("UncachedCompile") or 0)
