"""Routing drift of the policy's routers from the reference's: a hand-worked case, the
step-0 identity, and a training run where DPO moves the routers."""

import json
import math

import pytest
import torch

from moedpo.models.drift import routing_drift


def test_agreement_and_kl_by_hand():
    policy = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    reference = torch.tensor([[1.0, 2.0, 0.0, -1.0], [1.0, 0.0, 3.0, 0.0]])
    weight = torch.tensor([1.0, 2.0])  # token 1 counts twice (a shared prompt's)
    drift = routing_drift([policy], [reference], [None], [None], weight, top_k=2)
    # top-2: policy {0, 1} and {2, 3}; reference {1, 0} and {2, 0}: shares 1 and 1/2.
    assert drift.agreement.tolist() == pytest.approx([1 * 1.0 + 2 * 0.5])

    def kl(p_logits, q_logits):
        p = [math.exp(x) / sum(math.exp(y) for y in p_logits) for x in p_logits]
        q = [math.exp(x) / sum(math.exp(y) for y in q_logits) for x in q_logits]
        return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))

    expected = kl(policy[0].tolist(), reference[0].tolist()) \
        + 2 * kl(policy[1].tolist(), reference[1].tolist())
    assert drift.kl.tolist() == pytest.approx([expected], rel=1e-6)
    # The routers' own choices, where they return them, take precedence over the softmax.
    own = routing_drift([policy], [reference], [torch.tensor([[0, 1], [2, 3]])],
                        [torch.tensor([[2, 3], [2, 3]])], weight, top_k=2)
    assert own.agreement.tolist() == [0 * 1.0 + 2 * 1.0]


def test_identical_routers_agree_fully_with_zero_kl():
    logits = [torch.randn(7, 8), torch.randn(7, 8)]
    weight = torch.tensor([1.0] * 5 + [0.0] * 2)  # two padding tokens
    drift = routing_drift(logits, [x.clone() for x in logits], [None, None], [None, None],
                          weight, top_k=2)
    assert drift.agreement.tolist() == [5.0, 5.0]
    assert drift.kl.abs().max() < 1e-6


# Slow tier: a training run; agreement and KL by hand stay in the fast tier.
@pytest.mark.slow
def test_drift_starts_at_one_and_falls_as_the_router_trains(make_cfg):
    from conftest import tiny_train_overrides
    from moedpo.trainer import run

    result = run(make_cfg(*tiny_train_overrides(), "max_steps=16", "eval_frequency=8",
                          "sched.warmup_steps=0", "lr=3e-3"))
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/loss" in r]
    first, last = evals[0], evals[-1]
    layers = sum(1 for k in first if k.startswith("eval/moe/routing_agreement/layer"))
    assert layers == 4  # the tiny Mixtral's
    assert first["eval/moe/routing_agreement"] == 1.0
    assert first["eval/moe/router_kl"] == pytest.approx(0.0, abs=1e-7)
    assert last["eval/moe/routing_agreement"] < 0.99
    assert last["eval/moe/router_kl"] > 1e-4
    train = [r for r in rows if "train/loss" in r][-1]
    assert train["train/moe/routing_agreement"] < 1.0 and "train/moe/load_cv" in train
    assert first["eval/moe/load_cv"] > 0  # the random tiny router is far from balanced
