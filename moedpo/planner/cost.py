"""FLOPs and bytes of every operation of a traced step, for a roofline of its time: each
operation takes the longer of its FLOPs at the device's peak and its bytes (inputs and
outputs) at the memory bandwidth. Nothing fuses in this model and nothing overlaps, so it
errs towards slow on memory-bound work and towards fast on matmuls that miss their peak.

FLOPs come from torch's own formulas (`torch.utils.flop_counter.flop_registry`: matmuls and
attention; other operations count as memory traffic only). A dispatch mode rather than
`FlopCounterMode`, whose module hooks keep a step's tensors alive in reference cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

if TYPE_CHECKING:  # hardware.py times this CPU with an OpCosts
    from .hardware import Hardware

LOW_PRECISION = (torch.bfloat16, torch.float16)
# Operations that compute nothing on the device: metadata queries (`prim`), allocations
# (their memory is the tracker's, not traffic) and collectives, which the link model of
# planner/__init__.py times.
NO_WORK_NAMESPACES = ("prim", "c10d", "_c10d_functional", "_dtensor")
ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
               "resize_", "set_")


@dataclass
class Costs:
    """(flops, bytes, low precision) of each recorded operation."""

    ops: list[tuple[int, int, bool]] = field(default_factory=list)
    # bytes this rank put into all-to-alls (expert parallelism's token exchange); the link
    # model of planner/__init__.py times what leaves the rank
    exchanged: int = 0

    @property
    def flops(self) -> int:
        return sum(op[0] for op in self.ops)

    def seconds(self, hw: Hardware) -> float:
        """The time of the recorded operations on `hw`, one after another."""
        return sum(hw.op_seconds(*op) for op in self.ops)


class OpCosts(TorchDispatchMode):
    """Records the `Costs` of each operation run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded = Costs()

    @property
    def ops(self) -> list[tuple[int, int, bool]]:
        return self.recorded.ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "_c10d_functional" and func._overloadpacket.__name__ == \
                "all_to_all_single":
            self.recorded.exchanged += _bytes(args[0])
        if (func.is_view or func.namespace in NO_WORK_NAMESPACES
                or func._overloadpacket.__name__ in ALLOCATIONS):
            return out
        formula = flop_registry.get(func._overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula else 0
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        moved = sum(_bytes(t) for t in tree_flatten((args, kwargs))[0] + outputs
                    if isinstance(t, torch.Tensor))
        low = bool(outputs) and outputs[0].dtype in LOW_PRECISION
        self.ops.append((flops, moved, low))
        return out


def _bytes(t: torch.Tensor) -> int:
    if is_traceable_wrapper_subclass(t):  # a DTensor moves its local shard
        return sum(s.nbytes() for s in get_untyped_storages(t))
    return t.numel() * t.element_size()
