"""LD-DPO (loss.ld_alpha): each response's log-prob counts its tokens past the pair's shorter
length ld_alpha times; the same sums in every row layout, and TRL's reading of the rule."""

import pytest
import torch

from conftest import random_pairs
from moedpo.config import ModelConfig
from moedpo.data.collate import collate, collate_shared
from moedpo.models.load import build_models
from moedpo.step import batch_logps

ALPHA = 0.3


@pytest.fixture(scope="module")
def policy():
    model, _ = build_models(ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32"),
                            seed=2, with_reference=False)
    return model.eval()


def by_hand(model, pairs) -> torch.Tensor:
    """One unpadded sequence at a time, float64: sum of the first min(|c|, |r|) response
    token log-probs plus ALPHA x the rest."""
    sums = []
    for response_of in (lambda p: p.chosen, lambda p: p.rejected):
        for p in pairs:
            shorter = min(len(p.chosen), len(p.rejected))
            ids = torch.tensor([p.prompt + response_of(p)])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
            terms = [logprobs[t - 1, ids[0, t]] for t in range(len(p.prompt), ids.shape[1])]
            sums.append(float(sum(terms[:shorter]) + ALPHA * sum(terms[shorter:])))
    return torch.tensor(sums, dtype=torch.double)


@pytest.mark.parametrize("layout", ["plain", "shared", "packed"])
def test_weighted_sums_equal_hand_computation(policy, layout):
    pairs = random_pairs(5, seed=3)
    if layout == "plain":
        batch = collate(pairs, pad_id=1, ld_alpha=ALPHA)
    else:
        batch = collate_shared(pairs, pad_id=1, ld_alpha=ALPHA,
                               max_tokens=60 if layout == "packed" else 0)
    got, _ = batch_logps(policy, batch, -100)
    torch.testing.assert_close(got.logps.double(), by_hand(policy, pairs), rtol=1e-5, atol=1e-4)
    unweighted, _ = batch_logps(policy, {k: v for k, v in batch.items()
                                         if k != "token_weights"}, -100)
    longer = [max(len(p.chosen), len(p.rejected)) > min(len(p.chosen), len(p.rejected))
              for p in pairs]
    assert any(longer)  # some tails were down-weighted, so the sums differ there
    assert not torch.allclose(got.logps, unweighted.logps)
    assert torch.equal(got.n_tokens, unweighted.n_tokens)  # lengths stay whole
    torch.testing.assert_close(got.plain, unweighted.logps)  # the likelihoods, unweighted
    assert unweighted.plain is None


def test_alpha_one_is_plain_dpo(policy):
    pairs = random_pairs(4, seed=4)
    plain, _ = batch_logps(policy, collate(pairs, pad_id=1), -100)
    one, _ = batch_logps(policy, collate(pairs, pad_id=1, ld_alpha=1.0), -100)
    torch.testing.assert_close(one.logps, plain.logps)


def test_trl_reads_the_rule_the_same_way():
    """TRL 1.16's DPOTrainer with ld_alpha, fed per-token log-probs, gives the loss of the
    sums weighted as above."""
    pytest.importorskip("trl")
    from test_trl_parity import B, trl_loss

    from moedpo.logps import SequenceLogps
    from moedpo.losses import LossOptions, preference_loss

    completion, per_token, ref_token, weights, lengths = ld_batch(9)
    sums = (per_token * weights).sum(1)
    ref_sums = (ref_token * weights).sum(1)

    expected = trl_loss("sigmoid", completion, per_token, ref_sums, 0.2, 0.0, ld_alpha=ALPHA)
    policy = SequenceLogps(sums, lengths.double(), torch.zeros(2 * B, dtype=torch.double))
    reference = SequenceLogps(ref_sums, lengths.double(), torch.zeros(2 * B, dtype=torch.double))
    got = preference_loss(policy, reference, ["sigmoid"], None, LossOptions(beta=0.2))
    assert got.loss.item() == pytest.approx(expected, rel=1e-9)


def ld_batch(seed: int, chosen_length: int | None = None):
    """Per-token log-probs of B pairs with the LD weights of their lengths; `chosen_length`:
    every chosen response that long (TRL's NLL averages over the batch's tokens, equal to
    moedpo's per-pair mean when chosen lengths are equal)."""
    from test_trl_parity import B, T

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T - 3, (2 * B,), generator=g)
    if chosen_length is not None:
        lengths[:B] = chosen_length
        lengths[B:] = torch.randint(2, chosen_length, (B,), generator=g)  # shorter: a tail
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion[i, T - n:] = 1
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.double) * completion[:, 1:]
    ref_token = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.double) * completion[:, 1:]
    shorter = torch.minimum(lengths[:B], lengths[B:]).repeat(2)
    position = completion[:, 1:].cumsum(1)
    weights = torch.where(position <= shorter[:, None], 1.0, ALPHA).double()
    return completion, per_token, ref_token, weights, lengths


def test_nll_terms_and_means_read_unweighted_likelihoods():
    """loss.ld_alpha reweights the preference term only: the sft NLL equals TRL's with
    ld_alpha (which ignores it there), and SimPO's per-token means are the unweighted ones."""
    pytest.importorskip("trl")
    from test_trl_parity import B, T, trl_loss

    from moedpo.logps import SequenceLogps
    from moedpo.losses import LossOptions, preference_loss

    completion, per_token, ref_token, weights, lengths = ld_batch(11, chosen_length=T - 4)
    zeros = torch.zeros(2 * B, dtype=torch.double)
    weighted = SequenceLogps((per_token * weights).sum(1), lengths.double(), zeros,
                             plain=per_token.sum(1))
    reference = SequenceLogps((ref_token * weights).sum(1), lengths.double(), zeros)
    assert not torch.allclose(weighted.logps[:B], weighted.plain[:B])  # tails were weighted
    expected = trl_loss("sft", completion, per_token, reference.logps, 0.2, 0.0, ld_alpha=ALPHA)
    got = preference_loss(weighted, reference, ["sft"], None, LossOptions(beta=0.2))
    assert got.loss.item() == pytest.approx(expected, rel=1e-9)
    unweighted = SequenceLogps(per_token.sum(1), lengths.double(), zeros)
    for name in ("simpo", "orpo", "cpo"):
        a = preference_loss(weighted, reference, [name], None, LossOptions(beta=0.2))
        b = preference_loss(unweighted, reference, [name], None, LossOptions(beta=0.2))
        if name == "cpo":  # its preference term is on the sums: weighted; its NLL is not
            assert a.metrics["nll_loss"].tolist() == b.metrics["nll_loss"].tolist()
        else:
            assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-12), name
