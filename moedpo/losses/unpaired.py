"""Losses on unpaired rows (prompt, completion, label): each row's completion is judged on
its own, desirable or not (KTO, BCO, unpaired APO). In PairLogps the completion is `chosen`;
`rejected` is another row's completion for the same prompt (data/unpaired.py), whose
log-ratio estimates KTO's KL reference point; `labels` is 1 for a desirable row, 0 for an
undesirable one."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .base import LossOptions, PairLogps


def kl_estimate(p: PairLogps, o: LossOptions | None = None) -> torch.Tensor:
    """KTO's reference point z0: the micro-batch's mean log-ratio of mismatched completions
    (a KL(pi || pi_ref) estimate), floored at 0 and without gradient (paper, section 4.1);
    `o.kto_kl` where the caller took it over every rank's rows (global_kl_estimate)."""
    if o is not None and o.kto_kl is not None:
        return o.kto_kl
    return p.rejected_logratios.detach().mean().clamp(min=0)


def global_kl_estimate(p: PairLogps, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor],
                       rows: int | None = None) -> torch.Tensor:
    """z0 over the global micro-batch: every rank's mismatched log-ratios summed and divided
    by their number, so that N ranks of b rows give one process's z0 over N b rows (TRL
    averages the ranks' estimates, the same for equal batches). Only the first `rows` rows
    count (eval pads a rank's last batch with repeats)."""
    ratios = p.rejected_logratios.detach().float()
    counted = torch.ones_like(ratios)
    if rows is not None:
        counted = (torch.arange(ratios.numel(), device=ratios.device) < rows).float()
    totals = sum_over_ranks(torch.stack([(ratios * counted).sum(), counted.sum()]))
    return (totals[0] / totals[1].clamp(min=1)).clamp(min=0).to(p.chosen.dtype)


def _labels(p: PairLogps) -> torch.Tensor:
    if p.labels is None:
        raise ValueError("an unpaired loss on pairs without labels (rows need prompt, "
                         "completion, label)")
    return p.labels.to(p.chosen.dtype)


def kto(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """KTO (Ethayarajh et al., arXiv 2402.01306, eq. 7-8), with h the completion's log-ratio
    and z0 = kl_estimate: desirable rows lambda_D (1 - sigma(beta (h - z0))), undesirable
    rows lambda_U (1 - sigma(beta (z0 - h))); lambda = kto_desirable_weight /
    kto_undesirable_weight."""
    y, h, z = _labels(p), p.chosen_logratios, kl_estimate(p, o)
    desirable = o.kto_desirable_weight * (1 - torch.sigmoid(o.beta * (h - z)))
    undesirable = o.kto_undesirable_weight * (1 - torch.sigmoid(o.beta * (z - h)))
    return y * desirable + (1 - y) * undesirable


def apo_zero_unpaired(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """APO-zero on unpaired rows (D'Oosterlinck et al., arXiv 2408.06266, eq. 7 per row, as
    TRL's KTO trainer has it): desirable 1 - sigma(beta h), undesirable sigma(beta h)."""
    y, h = _labels(p), p.chosen_logratios
    return (y * (1 - torch.sigmoid(o.beta * h)) * o.kto_desirable_weight
            + (1 - y) * torch.sigmoid(o.beta * h) * o.kto_undesirable_weight)


def unpaired_metrics(p: PairLogps, o: LossOptions) -> dict[str, torch.Tensor]:
    """Per-row metrics where a pair's make no sense: `kl` (z0), the completion's reward and
    log-prob, and `rewards/accuracies`: whether the reward's side of z0 matches the label
    (h > z0 for a desirable row). `rewards/margins` is the signed distance beta (h - z0)
    (negated for undesirable rows): positive when the row is on its right side."""
    y, h, z = _labels(p).detach(), p.chosen_logratios.detach(), kl_estimate(p, o)
    sign = 2 * y - 1
    return {"kl": z.expand_as(h), "rewards/completion": o.beta * h,
            "rewards/accuracies": ((h > z).to(y.dtype) == y).to(y.dtype),
            "rewards/margins": o.beta * (h - z) * sign,
            "rewards/desirable_fraction": y}


def bco(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """BCO (Jung et al., arXiv 2404.04656, eq. 8, without the density-ratio matching of its
    section 4): a binary classifier on r = beta h shifted by delta, the running mean of the
    rewards (RewardShift): desirable rows -log sigma(r - delta), undesirable rows
    -log sigma(-(r - delta)), weighted as KTO's."""
    y, r = _labels(p), o.beta * p.chosen_logratios
    shifted = r - o.bco_delta
    return (y * -F.logsigmoid(shifted) * o.kto_desirable_weight
            + (1 - y) * -F.logsigmoid(-shifted) * o.kto_undesirable_weight)


class RewardShift:
    """BCO's delta: the running mean of each training micro-batch's mean reward beta h over
    its rows (all ranks' rows: `reduce` averages over them), updated before the loss reads
    it, as TRL's BCO trainer did. Plain floats, saved in checkpoints (`state`), so a resumed
    run continues with the same delta."""

    def __init__(self, reduce=lambda x: float(x)) -> None:
        self.mean, self.count, self.reduce = 0.0, 0, reduce

    def update(self, rewards: torch.Tensor) -> float:
        value = self.reduce(rewards.detach().float().mean())
        self.count += 1
        self.mean += (value - self.mean) / self.count
        return self.mean

    def state(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def restore(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])
