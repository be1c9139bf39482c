"""Every private attribute of transformers and torch that moedpo reads or writes, each behind
one function here with a test of it in tests/test_private_api.py.

A release that renames one of these breaks one function and its test, loudly, instead of
silently switching a code path elsewhere. Where a public API exists moedpo uses it instead;
each function says why it cannot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

# --- transformers -------------------------------------------------------------------------


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation a loaded model runs (`config._attn_implementation`:
    transformers sets it at load and through `set_attn_implementation`, and exposes no public
    getter)."""
    return getattr(model.config, "_attn_implementation", None)


def experts_implementation(model: nn.Module) -> str | None:
    """The experts implementation an MoE model runs (`config._experts_implementation`, set by
    `set_experts_implementation`; no public getter)."""
    return getattr(model.config, "_experts_implementation", None)


def router_logits_source(model: nn.Module) -> tuple[type[nn.Module], int] | None:
    """(router module class, index of the logits in its output) from which transformers
    records `router_logits` (`_can_record_outputs`, its output-capturing table: the one place
    that names a family's router class); None for a dense model."""
    target = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    if target is None:
        return None
    return getattr(target, "target_class", target), getattr(target, "index", 0)


def no_split_modules(model: nn.Module) -> list[str]:
    """The model's decoder-layer class names (`_no_split_modules`, what accelerate and FSDP
    wrappers shard by; not public API)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def causal_lm_class(config: Any) -> type | None:
    """The causal-LM class `AutoModelForCausalLM` builds for `config` (its `_model_mapping`:
    the public `from_config` builds a model, where this needs only the class); None for remote
    code or an unknown config."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping.get(type(config), None)


# What each attention implementation needs of the model class: transformers' own class flags.
_SUPPORT_FLAG = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                 "flex_attention": "_supports_flex_attn"}
# The attention implementations a model class declares support for (besides eager).
FLAGGED_ATTENTION = tuple(_SUPPORT_FLAG)


def supports_attention(model_class: type, name: str) -> bool:
    """Whether `model_class` declares support for attention `name` (its `_supports_sdpa`,
    `_supports_flash_attn`, `_supports_flex_attn` flags); eager and names without a flag: yes."""
    flag = _SUPPORT_FLAG.get(name)
    return flag is None or bool(getattr(model_class, flag, False))


def experts_gate(experts: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated experts' activation on the first projection's output, [.., 2 x I] -> [.., I]
    (`_apply_gate`: each family's own, e.g. gpt-oss's clamped swish; not public API)."""
    return experts._apply_gate


# --- torch --------------------------------------------------------------------------------


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter | torch.Tensor | None]:
    """`module`'s own parameter slots, writable (`_parameters`): attribute lookup reads them
    first, so a tensor put here is what the module's forward sees, with no re-registration
    (`register_parameter` takes only Parameters, and a cast copy or a DTensor's local shard
    must stay a plain tensor in the autograd graph)."""
    return module._parameters


@contextlib.contextmanager
def swapped_parameters(module: nn.Module,
                       tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, `module.<name>` is `tensors[name]` for each name; the originals come
    back after, even on an error."""
    slots = own_parameters(module)
    originals = {name: slots[name] for name in tensors}
    slots.update(tensors)
    try:
        yield
    finally:
        slots.update(originals)


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """Names of `module`'s own buffers that no state dict holds (rotary `inv_freq`):
    `_non_persistent_buffers_set`, which nn.Module keeps private."""
    return set(module._non_persistent_buffers_set)


def fsspec_storage(url: str, write: bool) -> Any:
    """DCP's storage reader or writer for an fsspec URL (gs://, memory://): torch exports
    FsspecReader and FsspecWriter only from `torch.distributed.checkpoint._fsspec_filesystem`."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    return FsspecWriter(url) if write else FsspecReader(url)


@contextlib.contextmanager
def real_mesh_bookkeeping() -> Iterator[None]:
    """Any active fake-tensor mode paused (torch's `unset_fake_temporarily`): FSDP2 builds a
    DeviceMesh when it shards a DTensor parameter (the experts' EP placement), whose
    coordinates need real tensors (`nonzero`); the parameters stay fake."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield
