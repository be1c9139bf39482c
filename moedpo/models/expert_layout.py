"""Every layout of transformers' fused experts as one canonical view.

transformers' experts modules (`use_experts_implementation`) store their weights in several
layouts, described by flags on the module:

- `has_gate`: `gate_up_proj` ([gate; up], or gate and up interleaved where
  `is_concatenated` is false: the module's own `_apply_gate` reads either) or, ungated,
  `up_proj` followed by the module's `act_fn`;
- `is_transposed`: weights stored [E, in, out] (gpt-oss) rather than [E, out, in];
- `has_bias`: `gate_up_proj_bias` / `up_proj_bias` [E, out] and `down_proj_bias` [E, H].

moedpo's experts implementations read `ExpertWeights`: views (no copies: autograd takes each
gradient back to the stored parameter) in the [E, out, in] layout with optional biases, and
the activation to apply between the two projections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ExpertWeights:
    first: torch.Tensor  # [E, F, H]: gate_up_proj (F = 2I) or, ungated, up_proj (F = I)
    first_bias: torch.Tensor | None  # [E, F]
    down: torch.Tensor  # [E, H, I]
    down_bias: torch.Tensor | None  # [E, H]
    activate: Callable[[torch.Tensor], torch.Tensor]  # [.., F] -> [.., I]

    @property
    def num_experts(self) -> int:
        return self.first.shape[0]


def unsupported_reason(experts: nn.Module) -> str | None:
    """Why moedpo's implementations cannot run this experts module (None: they can)."""
    if getattr(experts, "has_post_expert_norm", False):
        return "a norm after each expert"
    if getattr(experts, "has_gate", True):
        if not hasattr(experts, "gate_up_proj"):
            return "no gate_up_proj"
    elif not hasattr(experts, "up_proj") or not hasattr(experts, "act_fn"):
        return "no up_proj and act_fn"
    if not hasattr(experts, "down_proj"):
        return "no down_proj"
    return None


def is_experts(module: nn.Module) -> bool:
    """transformers' fused experts (the modules its experts interface dispatches)."""
    return hasattr(module, "down_proj") and (hasattr(module, "gate_up_proj")
                                             or hasattr(module, "up_proj")
                                             and hasattr(module, "has_gate"))


def expert_weights(experts: nn.Module) -> ExpertWeights:
    gated = getattr(experts, "has_gate", True)
    first = experts.gate_up_proj if gated else experts.up_proj
    down = experts.down_proj
    if getattr(experts, "is_transposed", False):
        first, down = first.transpose(1, 2), down.transpose(1, 2)
    biased = getattr(experts, "has_bias", False)
    first_bias = (experts.gate_up_proj_bias if gated else experts.up_proj_bias) if biased \
        else None
    return ExpertWeights(first, first_bias, down,
                         experts.down_proj_bias if biased else None,
                         experts._apply_gate if gated else experts.act_fn)


def all_experts_mlp(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """Every expert at once on [E, N, H] inputs -> [E, N, H] (the dense and dropped paths)."""
    hidden = torch.bmm(x, w.first.transpose(1, 2))
    if w.first_bias is not None:
        hidden = hidden + w.first_bias[:, None]
    out = torch.bmm(w.activate(hidden), w.down.transpose(1, 2))
    return out + w.down_bias[:, None] if w.down_bias is not None else out
