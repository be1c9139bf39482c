"""Losses that score each response's own log-ratio h = log pi/pi_ref against a target
rather than only the chosen-rejected difference: they also move the absolute likelihoods
(e.g. keep the chosen one from falling, which plain DPO allows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LossOptions, PairLogps


def nca_pair(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """NCA, pairwise (Chen et al., arXiv 2402.05369): with r = beta h,
    -log sigma(r_c) - 1/2 log sigma(-r_c) - 1/2 log sigma(-r_r)."""
    c, r = o.beta * p.chosen_logratios, o.beta * p.rejected_logratios
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def bco_pair(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """BCO on pairs (Jung et al., arXiv 2404.04656), without the reward shift or density
    ratio: a binary classifier on r = beta h: -log sigma(r_c) - log sigma(-r_r)."""
    return (-F.logsigmoid(o.beta * p.chosen_logratios)
            - F.logsigmoid(-o.beta * p.rejected_logratios))


def sppo_hard(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al., arXiv 2405.00675, eq. 4.7 with P = 1 for
    the chosen, 0 for the rejected): (h_c - 1/(2 beta))^2 + (h_r + 1/(2 beta))^2."""
    return ((p.chosen_logratios - 0.5 / o.beta) ** 2
            + (p.rejected_logratios + 0.5 / o.beta) ** 2)


def apo_zero(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al., arXiv 2408.06266, eq. 7), when the chosen responses
    are better than the model's own: 1 - sigma(beta h_c) + sigma(beta h_r)."""
    return (1 - torch.sigmoid(o.beta * p.chosen_logratios)
            + torch.sigmoid(o.beta * p.rejected_logratios))


def apo_down(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """APO-down (arXiv 2408.06266, eq. 8), when even the chosen responses are worse than the
    model's own: sigma(beta h_c) + 1 - sigma(beta (h_c - h_r))."""
    c = p.chosen_logratios
    return torch.sigmoid(o.beta * c) + 1 - torch.sigmoid(o.beta * (c - p.rejected_logratios))


def cal_dpo(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """Cal-DPO (Xiao et al., arXiv 2412.14516): DPO's contrast on the log-ratios
    plus a calibration of each to the scale of the true rewards, 1/(2 beta) and -1/(2 beta):
    -log sigma(h_c - h_r) + 1/2 [(h_c - 1/(2 beta))^2 + (h_r + 1/(2 beta))^2].

    The 1/2 is the authors' released trainer's (their `dpo_trainer.py`, loss type "Cal-DPO":
    `DPO_loss + 0.5 * Cal_loss`, the calibration as batch-mean squared errors, whose mean over
    the batch is this per-pair form): the implementation behind their reported results. The
    paper's equation writes the calibration without it; at step 0 with beta 0.1 that would be
    ln 2 + 50 instead of the authors' ln 2 + 25."""
    c, r = p.chosen_logratios, p.rejected_logratios
    return -F.logsigmoid(c - r) + 0.5 * ((c - 0.5 / o.beta) ** 2 + (r + 0.5 / o.beta) ** 2)
