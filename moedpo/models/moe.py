"""Experts implementations registered with transformers' experts interface.

transformers 5.x builds the experts of Mixtral (and Qwen-MoE, OLMoE, gpt-oss, ...) as one
module with fused weights (`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`, or another
layout: models/expert_layout.py reads them all), whose forward dispatches
on `config._experts_implementation` to a function `fn(experts, hidden [T, H], top_k_index
[T, k], top_k_weights [T, k]) -> [T, H]`. moedpo registers its own functions there:

- `moedpo_dense`: every expert on every token, weighted by its (possibly zero) routing weight.
  The original TPU trainer's static "for-loop dropless": shapes never change, E/k x the FLOPs.
- `moedpo_dropless`: exact top-k routing, no token dropped: slots sorted by expert, one
  matmul per expert (or `grouped_mm`), un-permuted and summed per token in rank order.
- `moedpo_dropped`: capacity-factor token dropping per sequence, computing only kept slots.

The interface passes tokens flattened over the batch, but capacity is per sequence: a forward
pre-hook on each MoE block records the sequence length on its experts module.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..config import ConfigError
from .expert_layout import LowRank, all_experts_mlp, expert_weights, is_experts, unsupported_reason
from .grouped_mlp import routed_expert_mlp

log = logging.getLogger(__name__)

# Slots per expert taken as given instead of counted from the routing: set only while the
# planner traces a step on fake tensors, which hold no routing to count (planner/trace.py).
_ASSUMED_LOADS: Callable[[int, int], list[int]] | None = None


@contextlib.contextmanager
def assumed_loads(loads: Callable[[int, int], list[int]]) -> Iterator[None]:
    """Dropless experts take `loads(slots, num_experts)` as each expert's slot count."""
    global _ASSUMED_LOADS
    outer, _ASSUMED_LOADS = _ASSUMED_LOADS, loads
    try:
        yield
    finally:
        _ASSUMED_LOADS = outer


def loads_assumed() -> Callable[[int, int], list[int]] | None:
    """The loads `assumed_loads` set (the planner's), or None: routing decides."""
    return _ASSUMED_LOADS


def capacity(seq_len: int, top_k: int, num_experts: int, factor: float,
             rounding: str = "floor") -> int:
    """Slots per expert per sequence. `floor` is the original's int(S*k/E*cf) (can be 0);
    `ceil` rounds up and keeps at least one slot, as MaxText does now: in exact rational
    arithmetic (the factor as written in decimal), since in floating point 400*2/8*1.1 is
    110.00000000000001 and would round up to 111."""
    if rounding == "ceil":
        exact = Fraction(seq_len * top_k, num_experts) * Fraction(repr(float(factor)))
        return max(1, math.ceil(exact))
    return int(seq_len * top_k / num_experts * factor)


def claim_places(top_k_index: torch.Tensor, num_experts: int,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S, k] expert ids -> [B, S, k]: 0-based place of each (token, rank) claim on its
    expert within the sequence, claims taken in token-major order (t0k0, t0k1, t1k0, ...).
    Tokens outside `token_mask` [B, S] (padding) claim nothing; their place is -1."""
    claims = F.one_hot(top_k_index, num_experts)
    if token_mask is not None:
        claims = claims * token_mask[:, :, None, None].to(claims.dtype)
    claims = claims.reshape(top_k_index.shape[0], -1, num_experts)
    return ((claims.cumsum(dim=1) * claims).sum(-1) - 1).reshape(top_k_index.shape)


def kept_slots(top_k_index: torch.Tensor, num_experts: int, slots: int,
               token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A slot is kept iff it is among the first `slots` claims on its expert."""
    place = claim_places(top_k_index, num_experts, token_mask)
    return (place >= 0) & (place < slots)


def _use_grouped_mm(hidden: torch.Tensor) -> bool:
    return hidden.device.type == "cuda" and hidden.dtype == torch.bfloat16 \
        and hasattr(F, "grouped_mm")


def _grouped_low_rank(lora: LowRank | None) -> bool:
    """grouped_mm takes the [slots, r] low-rank inputs where their rows are 16-byte aligned;
    other ranks fold the update into the weights (W + s B A) for the matmul instead."""
    return lora is None or lora.a.shape[1] * lora.a.element_size() % 16 == 0


def _grouped_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora: LowRank | None, offsets: torch.Tensor,
                        slot_expert: torch.Tensor) -> torch.Tensor:
    """Slots sorted by expert [N, in] -> [N, out]: x W_e^T (+ s (x A_e^T) B_e^T) (+ b_e)."""
    out = F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    if lora is not None:
        low = F.grouped_mm(x, lora.a.transpose(1, 2).contiguous(), offs=offsets)
        out = out + lora.scale * F.grouped_mm(low, lora.b.transpose(1, 2).contiguous(),
                                              offs=offsets)
    return out + bias[slot_expert] if bias is not None else out


def dropless_experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    tokens, top_k = top_k_index.shape
    w = expert_weights(experts)
    num_experts = w.num_experts
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # routing slots sorted by expert
    if _ASSUMED_LOADS is not None:
        loads = _ASSUMED_LOADS(flat.numel(), num_experts)
        counts = torch.tensor(loads, device=flat.device)
    else:
        counts = torch.bincount(flat, minlength=num_experts)
        loads = None
    slot_token = order // top_k
    slot_weight = top_k_weights.reshape(-1)[order].to(hidden.dtype)
    if _use_grouped_mm(hidden):
        offsets = counts.cumsum(0).to(torch.int32)
        slot_expert = flat[order]
        if not all(_grouped_low_rank(lora) for lora in (w.first_lora, w.down_lora)):
            w = w.folded()
        gate_up = _grouped_projection(hidden[slot_token], w.first, w.first_bias, w.first_lora,
                                      offsets, slot_expert)
        out_sorted = _grouped_projection(w.activate(gate_up), w.down, w.down_bias, w.down_lora,
                                         offsets, slot_expert)
        out_sorted = out_sorted * slot_weight[:, None]
    else:
        # One matmul per expert is as fast as grouped_mm on CPU (measured) and works for
        # every dtype; the split sizes cost one host sync per layer.
        out_sorted = routed_expert_mlp(hidden, slot_token, slot_weight,
                                       loads or counts.tolist(), w)
    # Back to (token, rank) order and summed over ranks, as HF does: deterministic, and the
    # same accumulation order in bf16.
    # index_select's backward keeps only the index (index_copy's would keep `out_sorted`).
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    out = out_sorted.index_select(0, position)
    return out.view(tokens, top_k, -1).sum(1).to(hidden.dtype)


def _on_experts(experts: nn.Module, buffer: torch.Tensor) -> torch.Tensor:
    """An [E, rows, H] buffer placed by expert where the experts are (XLA SPMD with an
    expert axis: parallel/spmd.py sets the annotation); as is elsewhere."""
    place = getattr(experts, "moedpo_shard_buffer", None)
    return place(buffer) if place is not None else buffer


def dropped_experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """Each expert processes only its kept slots: gather into a static [E, B*C, H] buffer,
    run the expert MLPs, scatter back weighted. Kept weights are not renormalised; a token
    that lost every slot passes its input through unchanged."""
    tokens, hidden_dim = hidden.shape
    batch, seq_len = getattr(experts, "moedpo_batch_shape", None) or (1, tokens)
    top_k = top_k_index.shape[-1]
    token_mask = getattr(experts, "moedpo_token_mask", None)
    w = expert_weights(experts)
    num_experts = w.num_experts
    slots = capacity(seq_len, top_k, num_experts, experts.moedpo_capacity_factor,
                     getattr(experts, "moedpo_capacity_rounding", "floor"))
    # Buffer row of every (token, rank) slot: expert-major, then sequence, then place;
    # dropped slots point at one extra row that stays zero.
    with torch.no_grad():
        place = claim_places(top_k_index.view(batch, seq_len, top_k), num_experts, token_mask)
        place = place.view(tokens, top_k)
        keep = (place >= 0) & (place < slots)
        seq = torch.arange(tokens, device=hidden.device).div(seq_len, rounding_mode="floor")
        rows = top_k_index * (batch * slots) + seq[:, None] * slots + place
        trash = num_experts * batch * slots
        rows = torch.where(keep, rows, torch.full_like(rows, trash))
        # Inverse map: which token fills each buffer row (empty rows read a zero token).
        source = torch.full((trash + 1,), tokens, dtype=torch.long, device=hidden.device)
        token_of_slot = torch.arange(tokens, device=hidden.device)[:, None].expand(-1, top_k)
        source.scatter_(0, rows.reshape(-1), token_of_slot.reshape(-1))
        source[trash] = tokens
    padded = torch.cat([hidden, hidden.new_zeros(1, hidden_dim)])
    buffer = _on_experts(experts, padded[source[:trash]].view(num_experts, batch * slots,
                                                              hidden_dim))
    out = _on_experts(experts, all_experts_mlp(w, buffer)).reshape(trash, hidden_dim)
    out = torch.cat([out, out.new_zeros(1, hidden_dim)])
    weights = (top_k_weights * keep).to(hidden.dtype)
    combined = (out[rows.reshape(-1)].view(tokens, top_k, hidden_dim) * weights[..., None]).sum(1)
    fully_dropped = ~keep.any(-1, keepdim=True)
    return torch.where(fully_dropped, hidden, combined)


def dense_experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    w = expert_weights(experts)
    weights = hidden.new_zeros(hidden.shape[0], w.num_experts)
    weights.scatter_(1, top_k_index, top_k_weights.to(hidden.dtype))
    every = _on_experts(experts, hidden.unsqueeze(0).expand(w.num_experts, -1, -1))
    out = _on_experts(experts, all_experts_mlp(w, every))
    return torch.einsum("te,eth->th", weights, out)


ALL_EXPERTS_FUNCTIONS.register("moedpo_dropless", dropless_experts_forward)
ALL_EXPERTS_FUNCTIONS.register("moedpo_dropped", dropped_experts_forward)
ALL_EXPERTS_FUNCTIONS.register("moedpo_dense", dense_experts_forward)


def _record_batch(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before each forward: the batch shape (capacity is per sequence) and, with
    moe_ignore_padding, which tokens are real, for every experts module of the model."""
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    mask = kwargs.get("attention_mask")
    shape = tuple(inputs.shape[:2]) if inputs is not None and inputs.dim() >= 2 else None
    for experts in model.moedpo_experts:
        experts.moedpo_batch_shape = shape
        use_mask = experts.moedpo_ignore_padding and mask is not None and mask.dim() == 2
        experts.moedpo_token_mask = mask.bool() if use_mask else None


def experts_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_experts(m)]


def moe_top_k(model: nn.Module) -> int | None:
    """Experts per token of an MoE model; None for dense models. Cached on the model: it is
    asked once per batch."""
    if not hasattr(model, "_moedpo_top_k"):
        config = model.config
        top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None)
        model._moedpo_top_k = top_k if experts_modules(model) else None
    return model._moedpo_top_k


def resolve_implementation(name: str, capacity_factor: float, static: bool = False) -> str:
    """`auto`: dropped with a capacity factor, else dropless, or dense where shapes must be
    static (XLA: dropless sizes its matmuls by the routing, which would recompile)."""
    if name == "auto":
        if capacity_factor > 0:
            return "dropped"
        return "dense" if static else "dropless"
    return name


def apply_moe_implementation(model: nn.Module, name: str, capacity_factor: float = 0.0,
                             rounding: str = "floor", ignore_padding: bool = True,
                             static: bool = False) -> str:
    """Switch every experts module of `model` to `name`; returns the implementation used
    ('none' for dense models, which have no experts)."""
    experts = experts_modules(model)
    if not experts:
        return "none"
    name = resolve_implementation(name, capacity_factor, static)
    model.moedpo_moe_implementation = name  # read where the experts are sharded (EP)
    if name.startswith("hf"):
        if static:
            log.warning("model.moe_implementation=%s: Hugging Face's experts have data-dependent "
                        "shapes; XLA recompiles them every step (use dense or dropped)", name)
        if name == "hf_eager":  # HF's own loop over the experts hit by the batch
            model.set_experts_implementation("eager")
        return name
    for module in experts:
        why = unsupported_reason(module)
        if why:
            raise ConfigError(f"model.moe_implementation={name}: {type(module).__name__} has "
                              f"{why}, which moedpo's experts do not handle; use "
                              "model.moe_implementation=hf")
    model.set_experts_implementation(f"moedpo_{name}")
    for module in experts:
        module.moedpo_capacity_factor = capacity_factor
        module.moedpo_capacity_rounding = rounding
        module.moedpo_ignore_padding = ignore_padding
    if name == "dropped" and not hasattr(model, "moedpo_experts"):
        model.moedpo_experts = experts
        model.register_forward_pre_hook(_record_batch, with_kwargs=True)
    return name
