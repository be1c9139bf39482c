"""f-DPO (Wang et al., arXiv 2309.16240): DPO under another f-divergence between policy and
reference replaces each log-ratio h = log t (t = pi/pi_ref) by f'(t), the divergence's
derivative. Reverse KL is DPO itself."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import F_DIVERGENCES


def scores(logratio: torch.Tensor, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(t) of t = exp(logratio): reverse KL log t; forward KL 1 - 1/t; Jensen-Shannon
    log(2t / (1 + t)); alpha-divergence (t^(alpha-1) - 1) / (alpha - 1) (alpha -> 1: log t),
    its exponent clamped (80; 11 in float16) as TRL does, so that exp stays finite in the
    input's dtype."""
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        top = 11.0 if logratio.dtype == torch.float16 else 80.0
        t = torch.clamp(((alpha - 1.0) * logratio).float(), max=top)
        return (torch.exp(t) - 1.0).to(logratio.dtype) / (alpha - 1.0)
    raise ValueError(f"loss.f_divergence={kind}: use one of {', '.join(F_DIVERGENCES)}")
