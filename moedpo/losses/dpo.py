"""Losses on the difference of the two responses' scores, Delta = s(chosen) - s(rejected),
s = log pi/pi_ref (or its f-divergence transform). The DPO family proper."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import LossOptions, PairLogps, smoothed_sigmoid


def sigmoid(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """DPO (Rafailov et al., arXiv 2305.18290): -log sigma(beta Delta); with
    label_smoothing e > 0 conservative DPO (cDPO): -(1-e) log sigma(beta Delta)
    - e log sigma(-beta Delta). TRL 1.16's sigmoid ignores label_smoothing."""
    return smoothed_sigmoid(o.beta * p.delta_score, o.label_smoothing)


def sigmoid_norm(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """Length-normalised DPO (Tulu 3, arXiv 2411.15124): -log sigma(beta (s_c/|y_c| -
    s_r/|y_r|)), each score divided by its response's token count."""
    c, r = p.mean_scores()
    return -F.logsigmoid(o.beta * (c - r))


def robust(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """Robust DPO (rDPO, Chowdhury et al., arXiv 2403.00409): unbiased under a label-flip
    rate e = label_smoothing: (-(1-e) log sigma(beta Delta) + e log sigma(-beta Delta))
    / (1 - 2e)."""
    e, x = o.label_smoothing, o.beta * p.delta_score
    return (-(1 - e) * F.logsigmoid(x) + e * F.logsigmoid(-x)) / (1 - 2 * e)


def hinge(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """SLiC's hinge on the reward margin (Zhao et al., arXiv 2305.10425):
    max(0, 1 - beta Delta)."""
    return torch.relu(1 - o.beta * p.delta_score)


def ipo(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """IPO (Azar et al., arXiv 2310.12036, eq. 17) on per-token scores, as TRL does (the
    authors' normalisation): (s_c/|y_c| - s_r/|y_r| - 1/(2 beta))^2."""
    c, r = p.mean_scores()
    return (c - r - 1 / (2 * o.beta)) ** 2


def exo_pair(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """EXO (Ji et al., arXiv 2402.00856, eq. 16), pairwise: KL(q || p_e) between the
    policy's q = softmax(beta s) over {chosen, rejected} and the smoothed label
    p_e = (1 - e, e), e = label_smoothing (> 0)."""
    x, e = o.beta * p.delta_score, o.label_smoothing
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-e))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(e)))


def discopop(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al., arXiv 2406.08414, eq. 5): the log-ratio-modulated blend of
    the logistic and exponential losses, m = sigma(beta Delta / tau):
    (1 - m) (-log sigma(beta Delta)) + m exp(-beta Delta), tau = discopop_tau."""
    x = o.beta * p.delta_score
    m = torch.sigmoid(x / o.discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m


def aot(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """AOT, paired (Melnyk et al., arXiv 2406.05882): distributional alignment by optimal
    transport in 1-D: the micro-batch's policy margins log pi(c) - log pi(r) and reference
    margins, each sorted, matched by rank, then the (smoothed) sigmoid loss on the
    differences. A batch statistic: it depends on which pairs share a micro-batch."""
    policy, _ = torch.sort(p.chosen - p.rejected)
    reference, _ = torch.sort(p.ref_chosen - p.ref_rejected)
    return smoothed_sigmoid(o.beta * (policy - reference), o.label_smoothing)


def aot_unpaired(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """AOT, unpaired (arXiv 2406.05882): the sorted chosen log-ratios matched by rank to the
    sorted rejected ones; (smoothed) sigmoid loss on the differences. A batch statistic."""
    chosen, _ = torch.sort(p.chosen_logratios)
    rejected, _ = torch.sort(p.rejected_logratios)
    return smoothed_sigmoid(o.beta * (chosen - rejected), o.label_smoothing)


def dpop(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """DPO-Positive (Smaug, Pal et al., arXiv 2402.13228, eq. 3): DPO with a penalty when the
    chosen response's likelihood falls below the reference's:
    -log sigma(beta (Delta - lambda max(0, log pi_ref(c) - log pi(c)))), lambda = dpop_lambda."""
    penalty = torch.relu(p.ref_chosen - p.chosen)
    return -F.logsigmoid(o.beta * (p.chosen_logratios - p.rejected_logratios
                                   - o.dpop_lambda * penalty))


def rdpo(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """R-DPO, length-regularised DPO (Park et al., arXiv 2403.19159, eq. 9):
    -log sigma(beta Delta - alpha (|y_c| - |y_r|)), alpha = rdpo_alpha: a longer chosen
    response earns less, so length stops being an easy win."""
    return -F.logsigmoid(o.beta * p.delta_score
                         - o.rdpo_alpha * (p.chosen_tokens - p.rejected_tokens))
