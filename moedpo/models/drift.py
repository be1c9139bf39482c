"""Routing drift: how far the policy's routers have moved from the reference's.

DPO moves the router too, and nothing in a preference trainer's usual metrics shows it. On
the same tokens (the same batch goes through both models), per layer:

- agreement: the share of the policy's (token, rank) choices that the reference's top-k also
  made, |top-k_policy & top-k_reference| / k averaged over real tokens: 1.0 at step 0;
- KL(policy || reference) of the two routers' distributions over experts (the softmax of
  their logits, whatever rule then picks the top-k), averaged over real tokens: 0 at step 0.

Both are sums over tokens here (weighted as the router losses weigh them: a shared prompt's
tokens twice), divided by the token count when a report window is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RoutingDrift:
    agreement: torch.Tensor  # [L] sums over tokens of the shared share of choices, detached
    kl: torch.Tensor  # [L] sums over tokens of KL(policy || reference)


def _top(logits: torch.Tensor, chosen: torch.Tensor | None, top_k: int) -> torch.Tensor:
    return chosen.long() if chosen is not None else logits.float().topk(top_k, dim=-1).indices


@torch.no_grad()
def routing_drift(policy_logits: Sequence[torch.Tensor],
                  reference_logits: Sequence[torch.Tensor],
                  policy_choices: Sequence[torch.Tensor | None],
                  reference_choices: Sequence[torch.Tensor | None],
                  weight: torch.Tensor, top_k: int) -> RoutingDrift:
    """Per-layer sums over tokens (`weight` [tokens]: how many times each counts, 0 for
    padding) of the choice agreement and the router KL of policy against reference."""
    agreement, kl = [], []
    for pol, ref, pol_top, ref_top in zip(policy_logits, reference_logits, policy_choices,
                                          reference_choices, strict=True):
        mine, theirs = _top(pol, pol_top, top_k), _top(ref, ref_top, top_k)
        shared = (mine[:, :, None] == theirs[:, None, :]).any(-1).float().sum(-1) / top_k
        log_p, log_q = F.log_softmax(pol.float(), -1), F.log_softmax(ref.float(), -1)
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        agreement.append((shared * weight).sum())
        kl.append((per_token * weight).sum())
    return RoutingDrift(torch.stack(agreement), torch.stack(kl))
