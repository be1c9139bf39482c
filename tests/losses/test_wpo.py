"""WPO (loss.use_weighting): each pair's loss times exp(mean_t log p_t - log sum_v p_v^2) of
both responses under the policy; the weights from every head and row layout, and TRL's."""

import pytest
import torch

from conftest import random_pairs
from moedpo.config import ModelConfig
from moedpo.data.collate import collate, collate_shared
from moedpo.logps import SequenceLogps
from moedpo.losses import LossOptions, preference_loss
from moedpo.models import chunked_head
from moedpo.models.load import build_models
from moedpo.step import batch_logps


def build(chunk: int = 0):
    model, _ = build_models(ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                                        logps_chunk_size=chunk), seed=3, with_reference=False)
    return model.eval()


@pytest.fixture(scope="module")
def policy():
    return build()


def by_hand(model, pairs) -> torch.Tensor:
    """float64, one unpadded sequence at a time: mean over the response's tokens of
    log p(token) - log sum_v p_v^2."""
    out = []
    for response_of in (lambda p: p.chosen, lambda p: p.rejected):
        for p in pairs:
            ids = torch.tensor([p.prompt + response_of(p)])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
            terms = [logprobs[t - 1, ids[0, t]] - torch.logsumexp(2 * logprobs[t - 1], -1)
                     for t in range(len(p.prompt), ids.shape[1])]
            out.append(float(sum(terms) / len(terms)))
    return torch.tensor(out, dtype=torch.double)


@pytest.mark.parametrize("layout", ["plain", "shared", "chunked-head"])
def test_weights_equal_hand_computation(policy, layout):
    pairs = random_pairs(4, seed=5)
    batch = (collate_shared(pairs, pad_id=1) if layout == "shared"
             else collate(pairs, pad_id=1))
    model = build(chunk=8) if layout == "chunked-head" else policy  # same weights (seed)
    assert chunked_head.is_enabled(model) == (layout == "chunked-head")
    got, _ = batch_logps(model, batch, -100, wpo=True)
    plain, _ = batch_logps(model, batch, -100)
    torch.testing.assert_close(got.wpo.double(), by_hand(policy, pairs), rtol=1e-5, atol=1e-5)
    assert plain.wpo is None and not got.wpo.requires_grad
    torch.testing.assert_close(got.logps, plain.logps)  # the log-probs themselves unchanged


def test_loss_weighted_as_trl_does():
    pytest.importorskip("trl")
    from test_trl_parity import B, batch, trl_loss

    completion, per_token, logps, ref, lengths = batch(11, equal_lengths=False)
    g = torch.Generator().manual_seed(12)
    # log sum p^2 is at least log p^2 of any one token: below the token's log-prob here.
    sum_sq = (per_token - torch.rand(per_token.shape, generator=g, dtype=torch.double)) \
        * completion[:, 1:]
    expected = trl_loss("sigmoid", completion, per_token, ref, 0.2, 0.0, sum_sq=sum_sq)
    wpo = ((per_token - sum_sq) * completion[:, 1:]).sum(1) / lengths
    policy = SequenceLogps(logps, lengths, torch.zeros_like(logps), wpo)
    reference = SequenceLogps(ref, lengths, torch.zeros_like(ref))
    out = preference_loss(policy, reference, ["sigmoid"], None,
                          LossOptions(beta=0.2, use_weighting=True))
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(out.metrics["wpo_weight"], torch.exp(wpo[:B] + wpo[B:]))
