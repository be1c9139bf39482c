"""The preference-optimization family: a registry of pure per-pair losses (one module per
family), combined as a weighted sum (`loss.name` a list, `loss.weights`), and the metrics
TRL reports beside them.

    dpo.py             losses on the chosen-rejected score difference (DPO and kin)
    pointwise.py       losses on each response's own log-ratio (NCA, BCO, SPPO, APO, Cal-DPO)
    reference_free.py  losses without a reference model (SimPO, CPO, AlphaPO, ORPO, SFT)
    unpaired.py        losses on unpaired rows (KTO, BCO, unpaired APO)
    divergence.py      f-DPO's scores of the log-ratios
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError
from ..logps import SequenceLogps
from . import divergence, dpo, pointwise, reference_free, unpaired
from .base import Loss, LossOptions, PairLogps

LS, TAU = ("label_smoothing",), ("discopop_tau",)
LOSSES: dict[str, Loss] = {
    "sigmoid": Loss(dpo.sigmoid, "2305.18290", f_divergence=True, options=LS),
    "sigmoid_norm": Loss(dpo.sigmoid_norm, "2411.15124", f_divergence=True),
    "robust": Loss(dpo.robust, "2403.00409", f_divergence=True, options=LS),
    "hinge": Loss(dpo.hinge, "2305.10425", f_divergence=True),
    "ipo": Loss(dpo.ipo, "2310.12036", f_divergence=True),
    "exo_pair": Loss(dpo.exo_pair, "2402.00856", f_divergence=True, options=LS),
    "discopop": Loss(dpo.discopop, "2406.08414", f_divergence=True, options=TAU),
    "aot": Loss(dpo.aot, "2406.05882", options=LS),
    "aot_unpaired": Loss(dpo.aot_unpaired, "2406.05882", options=LS),
    "dpop": Loss(dpo.dpop, "2402.13228", options=("dpop_lambda",)),
    "rdpo": Loss(dpo.rdpo, "2403.19159", f_divergence=True, options=("rdpo_alpha",)),
    "nca_pair": Loss(pointwise.nca_pair, "2402.05369"),
    "bco_pair": Loss(pointwise.bco_pair, "2404.04656"),
    "sppo_hard": Loss(pointwise.sppo_hard, "2405.00675"),
    "apo_zero": Loss(pointwise.apo_zero, "2408.06266"),
    "apo_down": Loss(pointwise.apo_down, "2408.06266"),
    "cal_dpo": Loss(pointwise.cal_dpo, "2412.14516"),
    "simpo": Loss(reference_free.simpo, "2405.14734", reference=False,
                  options=("simpo_gamma", *LS)),
    "cpo": Loss(reference_free.cpo, "2401.08417", reference=False, options=("cpo_alpha", *LS)),
    "alphapo": Loss(reference_free.alphapo, "2501.03884", reference=False,
                    options=("alphapo_alpha", "simpo_gamma", *LS)),
    "orpo": Loss(reference_free.orpo, "2403.07691", reference=False),
    "sft": Loss(reference_free.sft, "2404.19733", reference=False),
    "kto": Loss(unpaired.kto, "2402.01306", unpaired=True,
                options=("kto_desirable_weight", "kto_undesirable_weight")),
    "apo_zero_unpaired": Loss(unpaired.apo_zero_unpaired, "2408.06266", unpaired=True,
                              options=("kto_desirable_weight", "kto_undesirable_weight")),
    "bco": Loss(unpaired.bco, "2404.04656", unpaired=True,
                options=("kto_desirable_weight", "kto_undesirable_weight")),
}
# TRL 1.16's DPOTrainer takes these f-divergences only with these losses (same rule here).
F_DIVERGENCE_LOSSES = frozenset(n for n, spec in LOSSES.items() if spec.f_divergence) | {"sft"}


def loss_names(name: Any) -> list[str]:
    """`loss.name` as a list: one name, a list of names, or a comma-separated string;
    ConfigError for anything else (a number, null)."""
    if isinstance(name, str):
        return [n.strip() for n in name.split(",") if n.strip()]
    if isinstance(name, Sequence) and all(isinstance(n, str) for n in name):
        return list(name)
    raise ConfigError(f"loss.name={name}: give a loss name or a list of them (e.g. sigmoid, "
                      "or [sigmoid,sft])")


def describe(names: Sequence[str], weights: Sequence[float]) -> str:
    """`sigmoid (arXiv 2305.18290) + 0.2 x sft (arXiv 2404.19733)`: the startup log's loss."""
    return " + ".join(f"{'' if w == 1 else f'{w:g} x '}{n} (arXiv {LOSSES[n].paper})"
                      if LOSSES[n].paper != "-" else n for n, w in zip(names, weights, strict=True))


# LossConfig fields read by every loss (or by the step around it), never "unread".
ALWAYS_READ = frozenset({"use_weighting"})


def unread_options(names: Sequence[str], given: dict[str, Any],
                   defaults: dict[str, Any]) -> list[str]:
    """The loss options in `given` that differ from `defaults` though none of the losses
    `names` reads them (each a loss's `options`): a setting with no effect on this run."""
    read = {option for n in names for option in LOSSES[n].options} | ALWAYS_READ
    known = {option for spec in LOSSES.values() for option in spec.options}
    return [k for k in sorted(known - read) if given.get(k, defaults[k]) != defaults[k]]


def needs_reference(names: Sequence[str], reference_free: bool = False) -> bool:
    """Whether any of the losses reads the reference (else no reference model is built)."""
    return not reference_free and any(LOSSES[n].reference for n in names)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # mean over pairs of the batch (differentiable)
    metrics: dict[str, torch.Tensor]  # per-pair values, detached; averaged by the caller
    router: Any = None  # models.router.RouterOutput of the policy, for MoE models


def unpaired_losses(names: Sequence[str]) -> bool:
    return any(LOSSES[n].unpaired for n in names)


def pair_logps(policy: SequenceLogps, reference: SequenceLogps | None,
               f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
               labels: torch.Tensor | None = None) -> PairLogps:
    """The per-pair view of one forward's per-sequence sums (rows: chosen..., rejected...)."""
    chosen, rejected = policy.halves(policy.logps)
    if reference is None:
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    else:
        ref_chosen, ref_rejected = reference.halves(reference.logps.to(chosen.dtype))
    tokens_c, tokens_r = policy.halves(policy.n_tokens.to(chosen.dtype))
    p = PairLogps(chosen, rejected, ref_chosen, ref_rejected, tokens_c, tokens_r, labels=labels)
    if policy.plain is not None:  # LD-DPO: the unweighted sums beside the weighted ones
        p.chosen_plain, p.rejected_plain = policy.halves(policy.plain)
    if f_divergence != "reverse_kl":
        p.chosen_scores = divergence.scores(p.chosen_logratios, f_divergence, f_alpha)
        p.rejected_scores = divergence.scores(p.rejected_logratios, f_divergence, f_alpha)
    return p


def wpo_weights(policy: SequenceLogps) -> torch.Tensor:
    """WPO (Zhou et al., arXiv 2406.11827, eq. 2): each pair's weight, the product of its
    responses' exp(mean_t log p_t - log sum_v p_v^2) under the policy, without gradient: an
    off-policy pair the model would rarely sample counts less."""
    if policy.wpo is None:
        raise ValueError("loss.use_weighting: the policy's log-probs carry no WPO weights "
                         "(batch_logps(..., wpo=True))")
    chosen, rejected = policy.halves(policy.wpo.to(policy.logps.dtype))
    return torch.exp(chosen + rejected)


def preference_loss(policy: SequenceLogps, reference: SequenceLogps | None,
                    names: Sequence[str], weights: Sequence[float] | None,
                    options: LossOptions, f_divergence: str = "reverse_kl",
                    f_alpha: float = 0.5, labels: torch.Tensor | None = None) -> DPOOutput:
    """sum_i w_i mean_pairs(loss_i): the step's loss, and per-pair metrics named as TRL's.

    Rewards are beta x the summed log-ratios for every loss (TRL's definition), so that the
    reward metrics of two runs with different losses compare; with no reference they are
    beta x the policy's log-probs. Unpaired rows (`labels`) log losses/unpaired.py's metrics
    over the pair ones that mean nothing for them."""
    p = pair_logps(policy, reference, f_divergence, f_alpha, labels)
    weights = list(weights) if weights is not None else [1.0] * len(names)
    per_pair = torch.zeros_like(p.chosen)
    terms = {}
    wpo = wpo_weights(policy) if options.use_weighting else None
    for name, weight in zip(names, weights, strict=True):
        term = LOSSES[name].fn(p, options)
        if wpo is not None:
            term = term * wpo
        per_pair = per_pair + weight * term
        terms[f"loss/{name}"] = term.detach()
    chosen_rewards = options.beta * p.chosen_logratios.detach()
    rejected_rewards = options.beta * p.rejected_logratios.detach()
    logits_c, logits_r = policy.halves(policy.mean_logits)
    metrics = {
        "loss": per_pair.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": p.chosen.detach(),
        "logps/rejected": p.rejected.detach(),
        "logits/chosen": logits_c,
        "logits/rejected": logits_r,
        "nll_loss": reference_free.sft(p, options).detach(),
    }
    if len(names) > 1:
        metrics.update(terms)
    if wpo is not None:
        metrics["wpo_weight"] = wpo
    if unpaired_losses(names):
        for key in ("rewards/chosen", "rewards/rejected", "logps/rejected", "logits/rejected"):
            del metrics[key]
        metrics.update(unpaired.unpaired_metrics(p, options))
    if "orpo" in names:  # TRL's ORPO names: the log odds ratio, and log sigma of it
        log_odds = reference_free.log_odds_ratio(p).detach()
        metrics["log_odds_chosen"] = log_odds
        metrics["log_odds_ratio"] = torch.nn.functional.logsigmoid(log_odds)
    return DPOOutput(per_pair.mean(), metrics)


__all__ = ["LOSSES", "DPOOutput", "Loss", "LossOptions", "PairLogps", "loss_names",
           "needs_reference", "pair_logps", "preference_loss", "unpaired_losses"]
