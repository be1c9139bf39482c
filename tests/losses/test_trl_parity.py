"""Parity with TRL 1.16 (a dev dependency) on the same per-sequence log-probs: DPOTrainer's
own `_compute_loss` for every loss_type it has (fed by a stand-in model whose per-token
log-probs sum to the given values), and the CPO / ORPO trainers' loss methods for SimPO,
CPO, AlphaPO and ORPO. Equal-length responses where TRL averages the NLL over a batch's
tokens and moedpo over pairs (the two agree then; docs/losses/)."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from moedpo.logps import SequenceLogps
from moedpo.losses import LossOptions, preference_loss

trl = pytest.importorskip("trl")
from trl import DPOTrainer  # noqa: E402

TRL_DPO_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sft", "sigmoid_norm"]
B, T = 5, 12


class Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics


class StandInModel(torch.nn.Module):
    """Returns per-token log-probs spread evenly over each row's completion tokens, so that
    their sums are the given per-sequence log-probs (what TRL's fused head would give)."""

    def __init__(self, per_token: torch.Tensor, sum_sq: torch.Tensor | None = None):
        super().__init__()
        self.per_token, self.sum_sq = per_token, sum_sq

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool(), aux_loss=None,
                               log_sum_sq_probs=self.sum_sq)


def batch(seed: int, equal_lengths: bool):
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.full((2 * B,), 7) if equal_lengths
               else torch.randint(2, T - 3, (2 * B,), generator=g))
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion[i, T - n:] = 1  # prompt first, completion at the end
    logps = -lengths.double() * (0.5 + 2 * torch.rand(2 * B, generator=g, dtype=torch.double))
    ref = logps + 3 * (torch.rand(2 * B, generator=g, dtype=torch.double) - 0.5)
    shift = completion[:, 1:].double()
    per_token = shift * (logps / lengths.double())[:, None]
    return completion, per_token, logps, ref, lengths.double()


def trl_loss(name: str, completion, per_token, ref, beta, ls, f_div="reverse_kl",
             f_alpha=0.5, tau=0.05, ld_alpha=None, sum_sq=None) -> float:
    """TRL's loss; `ref`: the reference's per-sequence sums (TRL's precomputed path)."""
    t = DPOTrainer.__new__(DPOTrainer)
    t.loss_types, t.loss_weights = [name], [1.0]
    t.beta, t.label_smoothing, t.ld_alpha = beta, ls, ld_alpha
    t.f_divergence_type, t.f_alpha_divergence_coef = f_div, f_alpha
    t.use_weighting, t.aux_loss_enabled, t.precompute_ref_logps = sum_sq is not None, False, True
    t.args = SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None)
    t.accelerator, t._metrics = Accelerator(), defaultdict(lambda: defaultdict(list))
    t._total_train_tokens, t._tp_size = 0, 1
    t.model = StandInModel(per_token, sum_sq).train()
    ones = torch.ones_like(completion)
    inputs = {"input_ids": ones, "attention_mask": ones, "completion_mask": completion,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    return float(DPOTrainer._compute_loss(t, t.model, inputs, return_outputs=False))


def ours(name, logps, ref, lengths, opts, **kw) -> float:
    policy = SequenceLogps(logps, lengths, torch.zeros_like(logps))
    reference = SequenceLogps(ref, lengths, torch.zeros_like(ref))
    return preference_loss(policy, reference, [name], None, opts, **kw).loss.item()


@pytest.mark.parametrize("name", TRL_DPO_LOSSES)
def test_dpo_trainer_losses(name):
    ls = 0.1 if name in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    for seed in (0, 1):
        completion, per_token, logps, ref, lengths = batch(seed, equal_lengths=name == "sft")
        expected = trl_loss(name, completion, per_token, ref, 0.2, ls)
        got = ours(name, logps, ref, lengths, LossOptions(beta=0.2, label_smoothing=ls))
        # 1e-7: TRL takes exo_pair's epsilon as a float32 tensor.
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-12), (name, seed)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "sigmoid_norm", "discopop"])
def test_f_divergences(kind, name):
    completion, per_token, logps, ref, lengths = batch(2, equal_lengths=False)
    # float32: TRL's alpha-divergence clamp knows no float64.
    per_token, logps, ref, lengths = (x.float() for x in (per_token, logps, ref, lengths))
    expected = trl_loss(name, completion, per_token, ref, 0.2, 0.0, kind, 0.3)
    got = ours(name, logps, ref, lengths, LossOptions(beta=0.2), f_divergence=kind,
               f_alpha=0.3)
    assert got == pytest.approx(expected, rel=1e-5)


def cpo_self(loss_type: str, alpha: float = 0.0, beta: float = 0.2, ls: float = 0.0):
    return SimpleNamespace(alpha=alpha, loss_type=loss_type, beta=beta, simpo_gamma=0.4,
                           label_smoothing=ls, accelerator=Accelerator())


def test_simpo_cpo_alphapo_as_trl_cpo_trainer():
    from trl.experimental.cpo import CPOTrainer

    _, _, logps, _, lengths = batch(3, equal_lengths=True)
    mean = logps / lengths  # TRL's CPO scores simpo on per-token means, sigmoid on sums
    opts = LossOptions(beta=0.2, label_smoothing=0.1, simpo_gamma=0.4, cpo_alpha=0.5,
                       alphapo_alpha=0.3)
    free = SequenceLogps(logps, lengths, torch.zeros_like(logps))

    def got(name):
        return preference_loss(free, None, [name], None, opts).loss.item()

    simpo, _, _ = CPOTrainer.cpo_loss(cpo_self("simpo", ls=0.1), mean[:B], mean[B:])
    assert got("simpo") == pytest.approx(float(simpo.mean()), rel=1e-9)
    alphapo, _, _ = CPOTrainer.cpo_loss(cpo_self("simpo", 0.3, ls=0.1), mean[:B], mean[B:])
    assert got("alphapo") == pytest.approx(float(alphapo.mean()), rel=1e-9)
    cpo, _, _ = CPOTrainer.cpo_loss(cpo_self("sigmoid", ls=0.1), logps[:B], logps[B:])
    nll = float(-logps[:B].sum() / lengths[:B].sum())  # TRL: cross-entropy over the tokens
    assert got("cpo") == pytest.approx(float(cpo.mean()) + 0.5 * nll, rel=1e-9)


def test_orpo_as_trl_orpo_trainer():
    from trl.experimental.orpo import ORPOTrainer

    _, _, logps, _, lengths = batch(4, equal_lengths=True)
    mean = logps / lengths
    me = SimpleNamespace(beta=0.1, accelerator=Accelerator())
    losses, _, _, ratio, log_odds = ORPOTrainer.odds_ratio_loss(me, mean[:B], mean[B:])
    nll = float(-logps[:B].sum() / lengths[:B].sum())
    out = preference_loss(SequenceLogps(logps, lengths, torch.zeros_like(logps)), None,
                          ["orpo"], None, LossOptions(beta=0.1))
    assert out.loss.item() == pytest.approx(nll - float(losses.mean()), rel=1e-6)
    assert float(out.metrics["log_odds_ratio"].mean()) == pytest.approx(float(ratio), rel=1e-6)
    assert float(out.metrics["log_odds_chosen"].mean()) == pytest.approx(float(log_odds),
                                                                          rel=1e-6)
    assert not math.isnan(out.loss.item())
