"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, section 2.1.2): routers
that choose their top-k from the scores plus a per-expert correction bias
(`e_score_correction_bias`: DeepSeek-V3, GLM-4-MoE and their kin) get, after each optimizer
step, that bias moved by `rate` toward balance: down for an expert that took more than its
share of the step's tokens, up for one that took less (the sign of its load error). The bias
only steers the choice; the weights that mix the experts' outputs come from the unbiased
scores, so no gradient is involved and no loss term is added."""

from __future__ import annotations

import torch

from .router import router_modules

BIAS = "e_score_correction_bias"


def correction_bias_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's routers that have a correction bias, in layer order."""
    return [m for m in router_modules(model) if isinstance(getattr(m, BIAS, None),
                                                           torch.Tensor)]


@torch.no_grad()
def update_correction_biases(model: torch.nn.Module, counts: torch.Tensor,
                             rate: float) -> None:
    """`counts` [layers, experts]: the step's (token, rank) assignments per router, summed
    over micro-batches and ranks (so every rank moves its copy of the bias alike), in the
    order the routers ran (layer order, as `router_modules` lists them)."""
    routers = router_modules(model)
    if len(routers) != counts.shape[0]:
        raise ValueError(f"{counts.shape[0]} layers of expert counts for {len(routers)} routers")
    for router, layer in zip(routers, counts, strict=True):
        bias = getattr(router, BIAS, None)
        if isinstance(bias, torch.Tensor):
            layer = layer.to(bias.device, torch.float32)
            bias.add_(rate * torch.sign(layer.mean() - layer))
