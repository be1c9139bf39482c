import math

import pytest
import torch

from conftest import random_pairs
from moedpo.config import ModelConfig
from moedpo.data.collate import collate
from moedpo.logps import sequence_logps
from moedpo.models.load import build_models
from moedpo.step import batch_logps, batch_loss


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


def test_sequence_logps_ignores_label_pad_not_token_zero():
    logits = torch.randn(2, 4, 7, dtype=torch.double)
    labels = torch.tensor([[-100, 0, 3, -100], [-100, -100, 0, 0]])
    got = sequence_logps(logits, labels).logps
    lp = logits.log_softmax(-1)
    expected = [lp[0, 0, 0] + lp[0, 1, 3], lp[1, 1, 0] + lp[1, 2, 0]]
    torch.testing.assert_close(got.double(), torch.stack(expected))
