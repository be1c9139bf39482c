"""Experts implementations registered with transformers' experts interface.

transformers 5.x builds the experts of Mixtral (and Qwen-MoE, OLMoE, ...) as one module with
fused weights `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`, whose forward dispatches
on `config._experts_implementation` to a function `fn(experts, hidden [T, H], top_k_index
[T, k], top_k_weights [T, k]) -> [T, H]`. moedpo registers its own functions there:

- `moedpo_dense`: every expert on every token, weighted by its (possibly zero) routing weight.
  The original TPU trainer's static "for-loop dropless": shapes never change, E/k x the FLOPs.
- `moedpo_dropped`: capacity-factor token dropping per sequence, computing only kept slots.

The interface passes tokens flattened over the batch, but capacity is per sequence: a forward
pre-hook on each MoE block records the sequence length on its experts module.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS


def capacity(seq_len: int, top_k: int, num_experts: int, factor: float,
             rounding: str = "floor") -> int:
    """Slots per expert per sequence. `floor` is the original's int(S*k/E*cf) (can be 0);
    `ceil` rounds up and keeps at least one slot, as MaxText does now."""
    exact = seq_len * top_k / num_experts * factor
    if rounding == "ceil":
        return max(1, math.ceil(exact))
    return int(exact)


def claim_places(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[B, S, k] expert ids -> [B, S, k]: 0-based place of each (token, rank) claim on its
    expert within the sequence, claims taken in token-major order (t0k0, t0k1, t1k0, ...)."""
    claims = nn.functional.one_hot(top_k_index.reshape(top_k_index.shape[0], -1), num_experts)
    return ((claims.cumsum(dim=1) * claims).sum(-1) - 1).reshape(top_k_index.shape)


def kept_slots(top_k_index: torch.Tensor, num_experts: int, slots: int) -> torch.Tensor:
    """A slot is kept iff it is among the first `slots` claims on its expert."""
    return claim_places(top_k_index, num_experts) < slots


def _expert_mlp(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """All experts at once on [E, N, H] inputs -> [E, N, H]."""
    gate_up = torch.bmm(x, experts.gate_up_proj.transpose(1, 2))
    return torch.bmm(experts._apply_gate(gate_up), experts.down_proj.transpose(1, 2))


def dropped_experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """Each expert processes only its kept slots: gather into a static [E, B*C, H] buffer,
    run the expert MLPs, scatter back weighted. Kept weights are not renormalised; a token
    that lost every slot passes its input through unchanged."""
    seq_len = getattr(experts, "moedpo_seq_len", None) or hidden.shape[0]
    tokens, hidden_dim = hidden.shape
    batch, top_k = tokens // seq_len, top_k_index.shape[-1]
    num_experts = experts.gate_up_proj.shape[0]
    slots = capacity(seq_len, top_k, num_experts, experts.moedpo_capacity_factor,
                     getattr(experts, "moedpo_capacity_rounding", "floor"))
    # Buffer row of every (token, rank) slot: expert-major, then sequence, then place;
    # dropped slots point at one extra row that stays zero.
    with torch.no_grad():
        place = claim_places(top_k_index.view(batch, seq_len, top_k), num_experts)
        place = place.view(tokens, top_k)
        keep = place < slots
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
    buffer = padded[source[:trash]].view(num_experts, batch * slots, hidden_dim)
    out = _expert_mlp(experts, buffer).reshape(trash, hidden_dim)
    out = torch.cat([out, out.new_zeros(1, hidden_dim)])
    weights = (top_k_weights * keep).to(hidden.dtype)
    combined = (out[rows.reshape(-1)].view(tokens, top_k, hidden_dim) * weights[..., None]).sum(1)
    fully_dropped = ~keep.any(-1, keepdim=True)
    return torch.where(fully_dropped, hidden, combined)


def dense_experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    num_experts = experts.gate_up_proj.shape[0]
    weights = hidden.new_zeros(hidden.shape[0], num_experts)
    weights.scatter_(1, top_k_index, top_k_weights.to(hidden.dtype))
    out = _expert_mlp(experts, hidden.unsqueeze(0).expand(num_experts, -1, -1))
    return torch.einsum("te,eth->th", weights, out)


ALL_EXPERTS_FUNCTIONS.register("moedpo_dropped", dropped_experts_forward)
ALL_EXPERTS_FUNCTIONS.register("moedpo_dense", dense_experts_forward)


def _record_seq_len(block: nn.Module, args: tuple) -> None:
    block.experts.moedpo_seq_len = args[0].shape[1] if args[0].dim() == 3 else None


def experts_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]


def resolve_implementation(name: str, capacity_factor: float) -> str:
    if name == "auto":
        return "dropped" if capacity_factor > 0 else "hf"
    return name


def apply_moe_implementation(model: nn.Module, name: str, capacity_factor: float = 0.0,
                             rounding: str = "floor") -> str:
    """Switch every experts module of `model` to `name`; returns the implementation used
    ('none' for dense models, which have no experts)."""
    experts = experts_modules(model)
    if not experts:
        return "none"
    name = resolve_implementation(name, capacity_factor)
    if name == "hf":
        return "hf"
    model.set_experts_implementation(f"moedpo_{name}")
    for module in experts:
        module.moedpo_capacity_factor = capacity_factor
        module.moedpo_capacity_rounding = rounding
    if name == "dropped":
        for block in model.modules():
            if getattr(block, "experts", None) in experts and not getattr(block, "_moedpo_hook",
                                                                          False):
                block.register_forward_pre_hook(_record_seq_len)
                block._moedpo_hook = True
    return name
