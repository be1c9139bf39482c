"""KTO and unpaired APO-zero against TRL 1.16's KTOTrainer `_compute_loss` on the same
per-token log-probs (precomputed reference path): its KL estimate from the mismatched
completions, its desirable/undesirable weights, its mean over rows."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from moedpo.logps import SequenceLogps
from moedpo.losses import LossOptions, preference_loss

pytest.importorskip("trl")
from test_trl_parity import Accelerator  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

ROWS, T = 6, 10
KL_ROW = 2  # the stand-in model tells the KL forward by its input ids


class StandIn(torch.nn.Module):
    def __init__(self, per_token, kl_per_token):
        super().__init__()
        self.per_token, self.kl_per_token = per_token, kl_per_token

    def forward(self, input_ids, **kwargs):
        values = self.kl_per_token if int(input_ids[0, 0]) == KL_ROW else self.per_token
        zeros = torch.zeros_like(values)
        return SimpleNamespace(log_probs=values, entropy=zeros, mean_logits=zeros,
                               aux_loss=None)


def token_logps(g, completion):
    return -2 * torch.rand(ROWS, T - 1, generator=g, dtype=torch.double) * completion[:, 1:]


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("kl_shift", [0.0, 3.0], ids=["z0-floored", "z0-positive"])
def test_kto_trainer_losses(name, kl_shift):
    g = torch.Generator().manual_seed(21)
    lengths = torch.randint(2, T - 2, (ROWS,), generator=g)
    completion = torch.zeros(ROWS, T, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion[i, T - n:] = 1
    per_token, kl_per_token = token_logps(g, completion), token_logps(g, completion)
    ref = per_token.sum(1) + torch.randn(ROWS, generator=g, dtype=torch.double)
    # A positive shift makes the mismatched completions likelier under the policy: z0 > 0.
    ref_kl = kl_per_token.sum(1) - kl_shift + 0.1 * torch.randn(ROWS, generator=g,
                                                                 dtype=torch.double)
    labels = torch.tensor([True, False, True, True, False, False])

    t = KTOTrainer.__new__(KTOTrainer)
    t.loss_type, t.beta, t.calculate_KL = name, 0.2, True
    t.desirable_weight, t.undesirable_weight = 1.3, 0.7
    t.precompute_ref_logps, t.aux_loss_enabled = True, False
    t.accelerator, t._metrics = Accelerator(), defaultdict(lambda: defaultdict(list))
    t._total_train_tokens, t._tp_size = 0, 1
    t.model = StandIn(per_token, kl_per_token).train()
    ones = torch.ones(ROWS, T, dtype=torch.long)
    batch = {"input_ids": ones, "attention_mask": ones, "completion_mask": completion,
             "KL_input_ids": ones * KL_ROW, "KL_attention_mask": ones,
             "KL_completion_mask": completion, "label": labels, "ref_logps": ref,
             "ref_KL_logps": ref_kl}
    expected = float(KTOTrainer._compute_loss(t, t.model, batch, return_outputs=False))

    n = lengths.double()
    policy = SequenceLogps(torch.cat([per_token.sum(1), kl_per_token.sum(1)]),
                           torch.cat([n, n]), torch.zeros(2 * ROWS, dtype=torch.double))
    reference = SequenceLogps(torch.cat([ref, ref_kl]), torch.cat([n, n]),
                              torch.zeros(2 * ROWS, dtype=torch.double))
    out = preference_loss(policy, reference, [name], None,
                          LossOptions(beta=0.2, kto_desirable_weight=1.3,
                                      kto_undesirable_weight=0.7),
                          labels=labels.double())
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    if name == "kto":
        assert (out.metrics["kl"][0].item() > 0) == (kl_shift > 0)
        assert t._metrics["train"]["kl"][-1] == pytest.approx(out.metrics["kl"][0].item())
