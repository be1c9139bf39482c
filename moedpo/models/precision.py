"""Precision of the policy and the reference.

`model.policy_dtype=bfloat16` (or float16) is mixed precision, as FSDP2's
`MixedPrecisionPolicy` does it: the policy's parameters, gradients and optimizer state stay
float32 (the master weights), and forward and backward run on a low-precision copy of the
weights. An AdamW update at a DPO learning rate (5e-7..5e-6) is far below bfloat16's
resolution at a weight's magnitude (an ulp of 0.02 is 1.2e-4), so stepping bf16 parameters
rounds most updates away: the model barely learns. `model.mixed_precision=false` keeps the
old, pure low-precision parameters and optimizer state (half the memory; see docs/models.md,
"Precision").

Under FSDP2 its `MixedPrecisionPolicy` casts each layer's gathered shards (parallel/fsdp.py).
On one process and on XLA, `compute_copies` does the same for the whole model: inside it,
every floating parameter of the module tree is replaced by its low-precision copy, made
with autograd, so gradients arrive in the float32 masters. It spans forward *and* backward:
activation checkpointing runs layers' forwards again during the backward, and they must see
the same weights. Written here because torch has no public context for it (autocast casts
per op and keeps the residual stream in float32, which would no longer equal the bf16
reference at step 0; `torch.func.functional_call` covers one call, not the backward).

Only parameters change dtype: buffers (rotary `inv_freq`) stay float32, as
`from_pretrained(dtype=torch.bfloat16)` leaves them, in policy and reference alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..config import DTYPES, ModelConfig
from ..private_api import own_parameters


def is_mixed(cfg: ModelConfig) -> bool:
    """Whether the policy trains float32 masters with a low-precision compute copy."""
    return cfg.mixed_precision and DTYPES[cfg.policy_dtype] != torch.float32


def storage_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype of the policy's parameters (and so of its gradients and optimizer state)."""
    return torch.float32 if is_mixed(cfg) else DTYPES[cfg.policy_dtype]


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Floating parameters to `dtype`, in place; buffers keep their dtype."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


@contextlib.contextmanager
def compute_copies(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block, `model` computes with `dtype` copies of its floating parameters
    (tied weights cast once); the masters get the gradients. `dtype` None: as it is."""
    if dtype is None:
        yield
        return
    slots, copies = [], {}
    for module in model.modules():
        for name, param in own_parameters(module).items():
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            if id(param) not in copies:
                copies[id(param)] = param.to(dtype)
            # Module attribute lookup reads _parameters first, so the module's own code and
            # anything that reads `module.weight` (the chunked head) see the copy.
            own_parameters(module)[name] = copies[id(param)]
            slots.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in slots:
            own_parameters(module)[name] = param


def policy_compute_dtype(cfg: ModelConfig, fsdp: bool) -> torch.dtype | None:
    """The dtype `compute_copies` casts the policy to: None where nothing is to be cast
    (float32 policies, pure low precision, and FSDP2, whose mixed-precision policy casts)."""
    return DTYPES[cfg.policy_dtype] if is_mixed(cfg) and not fsdp else None
