"""Log-probabilities of responses and the DPO family of preference losses.

Inputs are the concatenated batch of the collator: the first half of the rows are chosen
responses, the second half rejected ones, with labels masked outside the response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .data.collate import SEGMENT_CHOSEN, SEGMENT_REJECTED


@dataclass
class SequenceLogps:
    """Per-sequence sums over response tokens (rows: chosen..., rejected...)."""

    logps: torch.Tensor  # summed log-probabilities, [2B]
    n_tokens: torch.Tensor  # response tokens, [2B]
    mean_logits: torch.Tensor  # mean raw logit over response positions and vocab, [2B] (metric)

    def halves(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = values.shape[0] // 2
        return values[:half], values[half:]


def _sums(values: torch.Tensor, layout: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """[rows, T-1] per-target values -> per-sequence sums: [rows], or for shared-prompt rows
    (`layout`: segments, pair_ids and pair_rows of data.collate_shared, packed or not)
    [2 x pairs]: chosen sums, then rejected, in the pairs' order."""
    if layout is None:
        return values.sum(-1)
    n_pairs = layout["pair_rows"].shape[0]  # from a shape: no device-to-host read
    segment = layout["segments"][:, 1:]  # position t predicts the token at t + 1
    response = (segment == SEGMENT_CHOSEN) | (segment == SEGMENT_REJECTED)
    slot = layout["pair_ids"][:, 1:].clamp(min=0) + n_pairs * (segment == SEGMENT_REJECTED)
    sums = torch.zeros(2 * n_pairs, dtype=values.dtype, device=values.device)
    return sums.index_add(0, slot.reshape(-1), (values * response).reshape(-1))


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, label_pad: int = -100,
                   segments: dict[str, torch.Tensor] | None = None) -> SequenceLogps:
    """Sum of log p(label_t | tokens < t) over positions whose label is not `label_pad`."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != label_pad
    token_logps = -F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~mask, -100),
                                   ignore_index=-100, reduction="none")
    n_tokens = _sums(mask.long(), segments)
    with torch.no_grad():
        mean_logits = _sums(logits.mean(-1) * mask, segments) / n_tokens.clamp(min=1)
    return SequenceLogps(_sums(token_logps, segments), n_tokens, mean_logits)


def sequence_logps_from_tokens(token_values: torch.Tensor, labels: torch.Tensor,
                                label_pad: int = -100,
                                segments: dict[str, torch.Tensor] | None = None
                                ) -> SequenceLogps:
    """The same sums from models.chunked_head's [rows, T, 2] output (per position: log-prob
    of the next label, 0 where it is `label_pad`; mean logit)."""
    mask = labels[:, 1:] != label_pad
    values = token_values[:, :-1]
    n_tokens = _sums(mask.long(), segments)
    with torch.no_grad():
        mean_logits = _sums(values[..., 1] * mask, segments) / n_tokens.clamp(min=1)
    return SequenceLogps(_sums(values[..., 0], segments), n_tokens, mean_logits)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                    name: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss of the DPO family from (policy, reference) log-probs of each response.

    sigmoid: DPO (Rafailov et al.); with label_smoothing > 0 conservative DPO (cDPO).
    robust: rDPO (Chowdhury et al.), unbiased under preference-label noise `label_smoothing`.
    hinge: SLiC-style hinge on the reward margin. ipo: IPO's squared loss (Azar et al.).
    """
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if name == "sigmoid":
        return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                - F.logsigmoid(-beta * logits) * label_smoothing)
    if name == "robust":
        return ((-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                 + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing))
    if name == "hinge":
        return torch.relu(1 - beta * logits)
    if name == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss.name={name}: unknown preference loss")


@dataclass
class DPOOutput:
    loss: torch.Tensor  # mean over pairs of the batch (differentiable)
    metrics: dict[str, torch.Tensor]  # per-pair values, detached; averaged by the caller
    router: Any = None  # models.router.RouterOutput of the policy, for MoE models


def dpo_loss(policy: SequenceLogps, reference: SequenceLogps | None, beta: float,
             name: str = "sigmoid", label_smoothing: float = 0.0,
             aux_nll_loss_coef: float = 0.0) -> DPOOutput:
    """`reference=None` is reference-free DPO (the reference log-ratio taken as 0).

    IPO scores length-normalised log-probs (mean per response token), as TRL does; the
    others use sums, as the DPO paper does. Rewards are beta x the summed log-ratios for every
    loss, as TRL reports them, so the reward metrics of two losses compare.
    """
    def scored(logps: SequenceLogps) -> torch.Tensor:
        return logps.logps / logps.n_tokens.clamp(min=1) if name == "ipo" else logps.logps

    pi_c, pi_r = policy.halves(scored(policy))
    if reference is None:
        ref_c, ref_r = torch.zeros_like(pi_c), torch.zeros_like(pi_r)
    else:
        ref_c, ref_r = reference.halves(scored(reference).to(pi_c.dtype))
    losses = preference_loss(pi_c, pi_r, ref_c, ref_r, beta, name, label_smoothing)
    loss = losses.mean()

    chosen_logps, rejected_logps = policy.halves(policy.logps)
    chosen_tokens, _ = policy.halves(policy.n_tokens)
    # RPO's NLL: per pair, normalised by the chosen response's length, then averaged, so it
    # does not depend on how a step's pairs are split over micro-batches or ranks.
    nll = -chosen_logps / chosen_tokens.clamp(min=1)
    if aux_nll_loss_coef > 0:
        loss = loss + aux_nll_loss_coef * nll.mean()

    if name == "ipo":  # the loss saw per-token means; the rewards are of sums
        pi_c, pi_r = chosen_logps, rejected_logps
        ref_c, ref_r = ((torch.zeros_like(pi_c), torch.zeros_like(pi_r)) if reference is None
                        else reference.halves(reference.logps.to(pi_c.dtype)))
    chosen_rewards = beta * (pi_c - ref_c).detach()
    rejected_rewards = beta * (pi_r - ref_r).detach()
    logits_c, logits_r = policy.halves(policy.mean_logits)
    metrics = {
        "loss": losses.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
        "logits/chosen": logits_c,
        "logits/rejected": logits_r,
        "nll_loss": nll.detach(),
    }
    return DPOOutput(loss, metrics)
