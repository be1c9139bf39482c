import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_pairs
from moedpo.config import ModelConfig
from moedpo.data.collate import collate
from moedpo.evaluate import batch_logps, batch_loss
from moedpo.loss import dpo_loss, preference_loss, sequence_logps
from moedpo.models.load import build_models


@pytest.fixture(scope="module")
def models():
    return build_models(ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                                    reference_dtype="float32"), seed=1)


def test_summed_logps_equal_unpadded_per_example(models):
    """Batched, padded log-probs == one unpadded example at a time, computed independently."""
    policy, _ = models
    policy.eval()
    pairs = random_pairs(4)
    batch = collate(pairs, pad_id=1)
    got, _ = batch_logps(policy, batch, -100)
    expected = []
    for response_of in (lambda p: p.chosen, lambda p: p.rejected):
        for p in pairs:
            ids = torch.tensor([p.prompt + response_of(p)])
            with torch.no_grad():
                logits = policy(input_ids=ids).logits[0].double()
            logprobs = logits.log_softmax(-1)
            total = sum(logprobs[t - 1, ids[0, t]] for t in range(len(p.prompt), ids.shape[1]))
            expected.append(float(total))
    torch.testing.assert_close(got.logps.double(), torch.tensor(expected, dtype=torch.double),
                               rtol=1e-5, atol=1e-4)
    assert got.n_tokens.tolist() == [len(p.chosen) for p in pairs] + [
        len(p.rejected) for p in pairs]


def test_loss_is_ln2_and_accuracy_zero_when_policy_equals_reference(models, make_cfg):
    policy, reference = models
    policy.eval()
    cfg = make_cfg()
    out = batch_loss(policy, reference, collate(random_pairs(6), pad_id=1), cfg)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["rewards/accuracies"].sum().item() == 0
    assert out.metrics["rewards/margins"].abs().max().item() < 1e-5


def hand_loss(logits: float, beta: float, name: str, ls: float) -> float:
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    z = beta * logits
    if name == "sigmoid":
        return -math.log(sig(z)) * (1 - ls) - math.log(sig(-z)) * ls
    if name == "robust":
        return (-math.log(sig(z)) * (1 - ls) + math.log(sig(-z)) * ls) / (1 - 2 * ls)
    if name == "hinge":
        return max(0.0, 1 - z)
    return (logits - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("name, ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1),
                                      ("hinge", 0.0), ("ipo", 0.0)])
def test_preference_losses_match_hand_formulas(name, ls):
    pc, pr = torch.tensor([-3.0, -8.0], dtype=torch.double), torch.tensor([-5.0, -2.0],
                                                                           dtype=torch.double)
    rc, rr = torch.tensor([-4.0, -6.0], dtype=torch.double), torch.tensor([-4.5, -3.0],
                                                                           dtype=torch.double)
    got = preference_loss(pc, pr, rc, rr, beta=0.5, name=name, label_smoothing=ls)
    logits = [(-3 + 5) - (-4 + 4.5), (-8 + 2) - (-6 + 3)]
    assert got.tolist() == pytest.approx([hand_loss(x, 0.5, name, ls) for x in logits])


def make_logps(chosen, rejected, n_c=(1, 1), n_r=(1, 1)):
    from moedpo.loss import SequenceLogps
    return SequenceLogps(torch.tensor(chosen + rejected), torch.tensor(list(n_c) + list(n_r)),
                         torch.zeros(4))


def test_rewards_accuracy_is_strict_and_reference_free_uses_zero():
    policy = make_logps([-1.0, -2.0], [-2.0, -2.0])
    ref = make_logps([-1.5, -2.0], [-1.5, -2.0])
    out = dpo_loss(policy, ref, beta=0.1)
    assert out.metrics["rewards/chosen"].tolist() == pytest.approx([0.05, 0.0])
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 0.0]  # tie is not a win
    free = dpo_loss(policy, None, beta=0.1)
    assert free.loss.item() == pytest.approx(
        float(-F.logsigmoid(torch.tensor([0.1 * 1.0, 0.0])).mean()))


def test_ipo_scores_mean_per_token_logps():
    policy = make_logps([-4.0, -2.0], [-6.0, -2.0], n_c=(2, 1), n_r=(3, 1))
    ref = make_logps([0.0, 0.0], [0.0, 0.0])
    out = dpo_loss(policy, ref, beta=0.5, name="ipo")
    # pair 0: (-4/2) - (-6/3) = 0 -> (0 - 1)^2; pair 1: 0 -> 1
    assert out.loss.item() == pytest.approx(1.0)
    # Rewards of summed log-ratios, as TRL reports them for every loss: 0.5 * (-4 - 0).
    assert out.metrics["rewards/chosen"].tolist() == [-2.0, -1.0]
    assert out.metrics["rewards/margins"].tolist() == [1.0, 0.0]


def test_aux_nll_adds_mean_per_pair_length_normalised_nll():
    policy = make_logps([-4.0, -3.0], [-6.0, -2.0], n_c=(2, 1), n_r=(3, 1))
    ref = make_logps([-4.0, -3.0], [-6.0, -2.0], n_c=(2, 1), n_r=(3, 1))
    base = dpo_loss(policy, ref, beta=0.1).loss.item()
    with_nll = dpo_loss(policy, ref, beta=0.1, aux_nll_loss_coef=0.5).loss.item()
    assert with_nll - base == pytest.approx(0.5 * (4 / 2 + 3 / 1) / 2)  # not 7/3 per token


def test_sequence_logps_ignores_label_pad_not_token_zero():
    logits = torch.randn(2, 4, 7, dtype=torch.double)
    labels = torch.tensor([[-100, 0, 3, -100], [-100, -100, 0, 0]])
    got = sequence_logps(logits, labels).logps
    lp = logits.log_softmax(-1)
    expected = [lp[0, 0, 0] + lp[0, 1, 3], lp[1, 1, 0] + lp[1, 2, 0]]
    torch.testing.assert_close(got.double(), torch.stack(expected))
