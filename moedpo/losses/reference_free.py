"""Losses that need no reference model: the policy's own log-probs, usually per token.
A run whose losses are all here loads no reference (no memory, no forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LossOptions, PairLogps, log1mexp, nll_per_token, smoothed_sigmoid


def simpo(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """SimPO (Meng et al., arXiv 2405.14734, eq. 6): -log sigma(beta (m_c - m_r) - gamma),
    m = log pi / |y| the mean per-token log-prob, gamma = simpo_gamma; with label smoothing
    as TRL's CPO trainer applies it. The paper's beta is 2 to 10, not DPO's 0.1."""
    c, r = p.mean_logps()
    return smoothed_sigmoid(o.beta * (c - r) - o.simpo_gamma, o.label_smoothing)


def cpo(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """CPO (Xu et al., arXiv 2401.08417, eq. 3 + the BC term): -log sigma(beta (log pi(c) -
    log pi(r))) on summed log-probs, plus cpo_alpha x the chosen response's NLL per token."""
    return (smoothed_sigmoid(o.beta * (p.chosen - p.rejected), o.label_smoothing)
            + o.cpo_alpha * nll_per_token(p))


def alphapo_rewards(p: PairLogps, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaPO's reward r = (1 - P^-alpha) / alpha of the per-token probability
    P = exp(m); alpha -> 0 gives SimPO's log P."""
    c, r = p.mean_logps()
    return (1 - torch.exp(-alpha * c)) / alpha, (1 - torch.exp(-alpha * r)) / alpha


def alphapo(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """AlphaPO (Gupta et al., arXiv 2501.03884): SimPO with the reward reshaped by
    alpha = alphapo_alpha: -log sigma(beta (r_c - r_r) - gamma)."""
    c, r = alphapo_rewards(p, o.alphapo_alpha)
    return smoothed_sigmoid(o.beta * (c - r) - o.simpo_gamma, o.label_smoothing)


def log_odds_ratio(p: PairLogps) -> torch.Tensor:
    """ORPO's log odds(c) - log odds(r), odds(y) = P / (1 - P), P = exp(mean log-prob)."""
    # At least float32: log(1 - P) cancels badly in bfloat16.
    c, r = (m.to(torch.promote_types(m.dtype, torch.float32)) for m in p.mean_logps())
    return (c - r) - (log1mexp(c) - log1mexp(r))


def orpo(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """ORPO (Hong et al., arXiv 2403.07691, eq. 6-7): the chosen response's NLL per token
    minus beta log sigma(log odds ratio); beta is the paper's lambda (0.1 there and in TRL)."""
    return nll_per_token(p) - o.beta * F.logsigmoid(log_odds_ratio(p)).to(p.chosen.dtype)


def sft(p: PairLogps, o: LossOptions) -> torch.Tensor:
    """Supervised fine-tuning on the chosen response: its NLL per token (RPO's term,
    Pang et al., arXiv 2404.19733; Llama 3 combined it with DPO)."""
    return nll_per_token(p)
