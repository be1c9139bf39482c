"""Log-probs from the last hidden state in chunks equal the plain full-logits computation,
values and gradients, and leave the model otherwise untouched."""

import copy

import pytest
import torch

from conftest import random_pairs
from moedpo.config import ModelConfig
from moedpo.data import collate
from moedpo.evaluate import batch_logps
from moedpo.models import chunked_head
from moedpo.models.load import build_models


@pytest.fixture(scope="module")
def tiny_policy():
    policy, _ = build_models(ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                                         reference_dtype="float32", logps_chunk_size=0), seed=3)
    return policy


def logps_and_grads(model, batch):
    model.zero_grad()
    logps, _ = batch_logps(model, batch, -100)
    weights = torch.linspace(-1, 1, logps.logps.shape[0])
    (logps.logps * weights).sum().backward()
    return logps, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_equals_full_logits(tiny_policy, chunk):
    batch = collate(random_pairs(5, seed=chunk), pad_id=0)
    plain, plain_grads = logps_and_grads(tiny_policy, batch)
    chunked_model = copy.deepcopy(tiny_policy)
    chunked_head.enable(chunked_model, chunk)
    chunked, chunked_grads = logps_and_grads(chunked_model, batch)
    torch.testing.assert_close(chunked.logps, plain.logps, rtol=0, atol=1e-5)
    assert torch.equal(chunked.n_tokens, plain.n_tokens)
    torch.testing.assert_close(chunked.mean_logits, plain.mean_logits, rtol=0, atol=1e-6)
    for name, grad in plain_grads.items():  # fp32 rounding scales with the gradient's size
        scale = float(grad.abs().max())
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6 * scale,
                                   msg=name)


def test_head_is_plain_outside_labels_and_names_unchanged(tiny_policy):
    model = copy.deepcopy(tiny_policy)
    names = list(model.state_dict())
    chunked_head.enable(model, 16)
    ids = torch.randint(3, 500, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_policy(input_ids=ids).logits)
        with chunked_head.labels_for(model, ids, -100):
            assert model(input_ids=ids).logits.shape == (2, 9, 2)
    assert list(model.state_dict()) == names


def test_policy_and_reference_heads_use_their_own_weights():
    policy, reference = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                                 policy_dtype="float32",
                                                 reference_dtype="float32"), seed=3)
    assert chunked_head.is_enabled(policy) and chunked_head.is_enabled(reference)
    with torch.no_grad():
        policy.get_output_embeddings().weight.mul_(2)
    batch = collate(random_pairs(2), pad_id=0)
    with torch.no_grad():
        a, _ = batch_logps(policy, batch, -100)
        b, _ = batch_logps(reference, batch, -100)
    assert not torch.allclose(a.logps, b.logps)
