"""Each private transformers/torch attribute moedpo reads (moedpo/private_api.py) against what
the libraries do in public: a renamed or re-meant attribute fails here, by name."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    LlamaConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
)

from moedpo import private_api as api

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def mixtral(**kwargs) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2)
    return AutoModelForCausalLM.from_config(config, **kwargs).eval()


def test_attention_and_experts_implementations_follow_transformers_setters():
    model = mixtral(attn_implementation="eager")
    assert api.attention_implementation(model) == "eager"
    model.set_attn_implementation("sdpa")
    assert api.attention_implementation(model) == "sdpa"
    model.set_experts_implementation("eager")
    assert api.experts_implementation(model) == "eager"


def test_router_logits_source_is_what_transformers_records():
    model = mixtral()
    router_class, index = api.router_logits_source(model)
    routers = [m for m in model.modules() if isinstance(m, router_class)]
    assert len(routers) == SHAPE["num_hidden_layers"]
    seen = []
    for router in routers:
        router.register_forward_hook(
            lambda _m, _i, out: seen.append(out[index] if isinstance(out, tuple) else out))
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 5))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert len(seen) == len(out.router_logits) == SHAPE["num_hidden_layers"]
    for ours, theirs in zip(seen, out.router_logits, strict=True):
        torch.testing.assert_close(ours.reshape(theirs.shape), theirs)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE))
    assert api.router_logits_source(dense) is None


def test_no_split_modules_names_the_decoder_layer():
    model = mixtral()
    assert api.no_split_modules(model) == [type(model.model.layers[0]).__name__]
    assert api.no_split_modules(nn.Linear(2, 2)) == []


def test_causal_lm_class_is_the_class_from_config_builds():
    config = MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2)
    assert api.causal_lm_class(config) is MixtralForCausalLM
    assert type(AutoModelForCausalLM.from_config(config)) is MixtralForCausalLM

    class Unregistered(PretrainedConfig):
        model_type = "moedpo_unregistered"

    assert api.causal_lm_class(Unregistered()) is None


def test_supports_attention_agrees_with_what_from_config_accepts():
    gpt_oss = GptOssConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2)
    klass = api.causal_lm_class(gpt_oss)
    assert api.supports_attention(MixtralForCausalLM, "sdpa")
    assert api.supports_attention(klass, "eager")
    assert not api.supports_attention(klass, "sdpa")  # attention sinks: no sdpa
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_config(gpt_oss, attn_implementation="sdpa")
    AutoModelForCausalLM.from_config(gpt_oss, attn_implementation="eager")


def test_experts_gate_is_act_of_gate_times_up():
    experts = mixtral().model.layers[0].mlp.experts
    width = SHAPE["intermediate_size"]
    x = torch.randn(3, 2 * width, dtype=torch.float64)
    gate, up = x[..., :width], x[..., width:]
    torch.testing.assert_close(api.experts_gate(experts)(x), experts.act_fn(gate) * up)


def test_swapped_parameters_are_what_forward_sees_and_come_back():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    weight, x = layer.weight, torch.randn(4, 3)
    plain = torch.randn(2, 3)
    with api.swapped_parameters(layer, {"weight": plain}):
        torch.testing.assert_close(layer(x), x @ plain.T + layer.bias)
    assert layer.weight is weight
    with pytest.raises(RuntimeError), api.swapped_parameters(layer, {"weight": plain}):
        raise RuntimeError("inside")
    assert layer.weight is weight
    assert set(api.own_parameters(layer)) == {"weight", "bias"}


def test_non_persistent_buffers_are_the_ones_no_state_dict_holds():
    rotary = mixtral().model.rotary_emb
    names = api.non_persistent_buffers(rotary)
    assert "inv_freq" in names
    assert not names & set(rotary.state_dict())
    assert names <= {name for name, _ in rotary.named_buffers(recurse=False)}


def test_fsspec_storage_round_trips_a_checkpoint():
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    dcp.save(state, storage_writer=api.fsspec_storage("memory://moedpo-private-api", write=True))
    back = {"w": torch.zeros(2, 3)}
    dcp.load(back, storage_reader=api.fsspec_storage("memory://moedpo-private-api", write=False))
    torch.testing.assert_close(back["w"], state["w"])
