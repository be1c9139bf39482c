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

Under LoRA (PEFT `target_parameters`) each stacked weight is parametrized during the experts'
forward as W + s * lhs @ rhs. Reading the attribute folds that into a full copy of the expert
stack, whose gradient (every expert's full weight gradient) autograd then computes and
contracts back to the factors. `expert_weights` reads the frozen W and the factors instead
(`LowRank`), so the implementations add the low-rank path x A_e^T B_e^T beside x W_e^T: no
fold, no base weight gradient. Any other parametrization is read folded, as PEFT means it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..private_api import experts_gate


@dataclass
class LowRank:
    """A LoRA update of one stacked weight in the canonical layout: W_e + scale * b_e @ a_e."""
    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r]
    scale: float

    def delta(self) -> torch.Tensor:
        return self.scale * torch.bmm(self.b, self.a)


@dataclass
class ExpertWeights:
    first: torch.Tensor  # [E, F, H]: gate_up_proj (F = 2I) or, ungated, up_proj (F = I)
    first_bias: torch.Tensor | None  # [E, F]
    down: torch.Tensor  # [E, H, I]
    down_bias: torch.Tensor | None  # [E, H]
    activate: Callable[[torch.Tensor], torch.Tensor]  # [.., F] -> [.., I]
    first_lora: LowRank | None = None
    down_lora: LowRank | None = None

    @property
    def num_experts(self) -> int:
        return self.first.shape[0]

    def folded(self) -> ExpertWeights:
        """The same weights with any low-rank update added into them (W + s B A)."""
        def fold(w, lora):
            return w if lora is None else w + lora.delta().to(w.dtype)
        return ExpertWeights(fold(self.first, self.first_lora), self.first_bias,
                             fold(self.down, self.down_lora), self.down_bias, self.activate)


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


def _stacked(experts: nn.Module, name: str, transposed: bool) -> tuple[torch.Tensor,
                                                                          LowRank | None]:
    """A stacked weight in the [E, out, in] layout, and its LoRA factors when PEFT has
    parametrized it with exactly one low-rank update (its `_LoraFactorsProxy`)."""
    if parametrize.is_parametrized(experts, name):
        chain = experts.parametrizations[name]
        proxy = chain[0] if len(chain) == 1 else None
        if all(hasattr(proxy, key) for key in ("lhs", "rhs", "scaling")):
            weight, lhs, rhs = chain.original, proxy.lhs, proxy.rhs  # delta = s * lhs @ rhs
            if transposed:
                weight, lhs, rhs = weight.transpose(1, 2), rhs.transpose(1, 2), \
                    lhs.transpose(1, 2)
            return weight, LowRank(a=rhs, b=lhs, scale=float(proxy.scaling))
    weight = getattr(experts, name)
    return (weight.transpose(1, 2) if transposed else weight), None


def expert_weights(experts: nn.Module) -> ExpertWeights:
    gated = getattr(experts, "has_gate", True)
    transposed = getattr(experts, "is_transposed", False)
    first, first_lora = _stacked(experts, "gate_up_proj" if gated else "up_proj", transposed)
    down, down_lora = _stacked(experts, "down_proj", transposed)
    biased = getattr(experts, "has_bias", False)
    first_bias = (experts.gate_up_proj_bias if gated else experts.up_proj_bias) if biased \
        else None
    return ExpertWeights(first, first_bias, down,
                         experts.down_proj_bias if biased else None,
                         experts_gate(experts) if gated else experts.act_fn, first_lora, down_lora)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             lora: LowRank | None) -> torch.Tensor:
    """[E, N, in] -> [E, N, out]: x W_e^T (+ s (x A_e^T) B_e^T) (+ b_e)."""
    out = torch.bmm(x, weight.transpose(1, 2))
    if lora is not None:
        low = torch.bmm(torch.bmm(x, lora.a.transpose(1, 2)), lora.b.transpose(1, 2))
        out = out + lora.scale * low
    return out + bias[:, None] if bias is not None else out


def all_experts_mlp(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """Every expert at once on [E, N, H] inputs -> [E, N, H] (the dense and dropped paths)."""
    hidden = _project(x, w.first, w.first_bias, w.first_lora)
    return _project(w.activate(hidden), w.down, w.down_bias, w.down_lora)
