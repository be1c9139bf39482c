"""Log-probs from the last hidden state in chunks equal the plain full-logits computation,
values and gradients, and leave the model otherwise untouched."""

import copy

import pytest
import torch

from conftest import random_pairs
from moedpo.config import ModelConfig
from moedpo.data import collate
from moedpo.models import chunked_head
from moedpo.models.load import build_models
from moedpo.step import batch_logps


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


def family(name: str):
    """Tiny models of the families whose logits are transformed after the head, built from
    their transformers config classes, with the transform made large enough to matter."""
    import transformers as tf

    small = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    configs = {
        "granite": lambda: tf.GraniteConfig(**small, logits_scaling=8.0),
        "granitemoe": lambda: tf.GraniteMoeConfig(**small, logits_scaling=8.0, num_local_experts=4,
                                                  num_experts_per_tok=2),
        "gemma2": lambda: tf.Gemma2Config(**small, head_dim=8, final_logit_softcapping=0.5),
        "gemma3": lambda: tf.Gemma3TextConfig(**small, head_dim=8, final_logit_softcapping=0.5),
        "cohere": lambda: tf.CohereConfig(**small, logit_scale=4.0),
        "cohere2": lambda: tf.Cohere2Config(**small, logit_scale=4.0),
    }
    torch.manual_seed(0)
    config = configs[name]()
    config.tie_word_embeddings = False
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # logits far from uniform, so a missing transform shows
        model.get_output_embeddings().weight.normal_(0, 2.0)
    return model.float()


@pytest.mark.parametrize("name", ["granite", "granitemoe", "gemma2", "gemma3", "cohere",
                                  "cohere2"])
def test_chunked_applies_the_models_logit_transform(name):
    model = family(name)
    batch = collate(random_pairs(4, seed=1), pad_id=0)
    plain, plain_grads = logps_and_grads(model, batch)
    chunked_model = copy.deepcopy(model)
    assert chunked_head.enable(chunked_model, 7)
    assert chunked_head.LogitTransform.of(model.config) != chunked_head.LogitTransform()
    chunked, chunked_grads = logps_and_grads(chunked_model, batch)
    torch.testing.assert_close(chunked.logps, plain.logps, rtol=1e-5, atol=1e-4)
    for key, grad in plain_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(chunked_grads[key], grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=key)


def test_a_forward_not_transformers_own_keeps_full_logits(caplog):
    """A user's subclass (or remote code) of a known family may transform its logits in any
    way: the table is keyed by transformers' own forward, so it gets full logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class Tempered(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            hidden = out.last_hidden_state
            logits = self.lm_head(hidden)
            logits = logits * 3.0 + 1.0
            return type("Out", (), {"logits": logits})()

    model = Tempered(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4))
    with caplog.at_level("INFO"):
        assert not chunked_head.enable(model, 7)
    assert not chunked_head.is_enabled(model)
    assert "a model whose forward is not transformers' own" in caplog.text
    assert "logps_chunk_size has no effect" in caplog.text
    # Its own transform is what the log-probs see: the head alone (what chunks would compute)
    # gives other values.
    plain = LlamaForCausalLM(model.config)
    plain.load_state_dict(model.state_dict())
    batch = collate(random_pairs(2, seed=4), pad_id=0)
    with torch.no_grad():
        tempered, _ = batch_logps(model, batch, -100)
        head_only, _ = batch_logps(plain, batch, -100)
        logits = model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(tempered.logps, head_only.logps, atol=1e-3)
    torch.testing.assert_close(logits, plain(input_ids=batch["input_ids"]).logits * 3.0 + 1.0)
