"""What every preference loss reads: per-pair sums of response log-probabilities under the
policy and the reference, and the responses' lengths. Nothing here sees tokens or models, so
each loss is a pure function of a handful of [pairs] tensors and can be checked by hand."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """One micro-batch's pairs: [B] tensors. `ref_*` are zeros for a reference-free run."""

    chosen: torch.Tensor  # policy log p(chosen | prompt), summed over the response's tokens
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # response lengths in tokens (float)
    rejected_tokens: torch.Tensor
    # The f-divergence's scores of the log-ratios (losses/divergence.py); the log-ratios
    # themselves under reverse KL, DPO's own.
    chosen_scores: torch.Tensor | None = None
    rejected_scores: torch.Tensor | None = None
    # Unpaired rows (losses/unpaired.py): 1 desirable, 0 undesirable; None for pairs.
    labels: torch.Tensor | None = None
    # The policy's unweighted sums where `chosen`/`rejected` carry LD-DPO's token weights
    # (loss.ld_alpha): the responses' likelihoods, which NLL terms and per-token means read
    # (LD-DPO reweights the preference term only; TRL's NLL ignores ld_alpha too). None: the
    # same as `chosen`/`rejected`.
    chosen_plain: torch.Tensor | None = None
    rejected_plain: torch.Tensor | None = None

    @property
    def likelihoods(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's summed log-probs of each response, unweighted."""
        return (self.chosen if self.chosen_plain is None else self.chosen_plain,
                self.rejected if self.rejected_plain is None else self.rejected_plain)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def delta_score(self) -> torch.Tensor:
        """The chosen-minus-rejected difference of scores: DPO's implicit reward margin / beta.
        Under reverse KL as (pi_c - pi_r) - (ref_c - ref_r), the DPO paper's order (TRL takes
        (pi_c - ref_c) - (pi_r - ref_r)): the same up to float32 rounding, and the order
        moedpo's runs have always had, so their numbers stay where they were."""
        if self.chosen_scores is None:
            return (self.chosen - self.rejected) - (self.ref_chosen - self.ref_rejected)
        return self.chosen_scores - self.rejected_scores

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chosen_scores is None:
            return self.chosen_logratios, self.rejected_logratios
        return self.chosen_scores, self.rejected_scores

    def mean_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores per response token (IPO, length-normalised DPO)."""
        c, r = self.scores()
        return c / self.chosen_tokens.clamp(min=1), r / self.rejected_tokens.clamp(min=1)

    def mean_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy log-probs per response token (SimPO, ORPO, AlphaPO), unweighted."""
        chosen, rejected = self.likelihoods
        return (chosen / self.chosen_tokens.clamp(min=1),
                rejected / self.rejected_tokens.clamp(min=1))


@dataclass
class LossOptions:
    """The knobs of the loss family (config.LossConfig's, plus beta), in one place."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    alphapo_alpha: float = 0.25
    dpop_lambda: float = 50.0
    rdpo_alpha: float = 0.01
    discopop_tau: float = 0.05
    use_weighting: bool = False  # WPO: each pair's loss times its responses' weights
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    bco_delta: float = 0.0  # BCO's reward shift, from losses.unpaired.RewardShift
    # KTO's z0 over every rank's rows (losses.unpaired.global_kl_estimate); None: the
    # micro-batch's own.
    kto_kl: torch.Tensor | None = None


LossFn = Callable[[PairLogps, LossOptions], torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """A registry entry: the per-pair function and what it needs."""

    fn: LossFn
    paper: str  # arXiv id (or "-" for a plain NLL)
    reference: bool = True  # reads the reference's log-probs (else no reference model at all)
    f_divergence: bool = False  # scores the log-ratios through loss.f_divergence
    unpaired: bool = False  # reads unpaired rows (prompt, completion, label), not pairs
    options: tuple[str, ...] = field(default=())  # the LossOptions it reads besides beta


def smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigma(x), with conservative-DPO label smoothing e:
    -(1 - e) log sigma(x) - e log sigma(-x)."""
    return (-F.logsigmoid(logits) * (1 - label_smoothing)
            - F.logsigmoid(-logits) * label_smoothing)


def nll_per_token(p: PairLogps) -> torch.Tensor:
    """The chosen response's negative log-likelihood per token, per pair. Per pair and not
    per batch token (TRL averages over all of a batch's chosen tokens) so that the value does
    not depend on how a step's pairs are split into micro-batches and ranks; the two agree
    when the responses are equally long."""
    return -p.likelihoods[0] / p.chosen_tokens.clamp(min=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012: branch at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
