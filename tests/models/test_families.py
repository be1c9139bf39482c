"""moedpo's experts implementations on every MoE family transformers builds with its experts
interface, against Hugging Face's own forward (its eager experts loop) on tiny random models
built from each family's config class: logits and every parameter's gradient (float32), the
dropped path at capacity factor E/k (nothing dropped) included. Shared experts (Qwen2-MoE,
DeepSeek-V3, GLM-4-MoE) and dense first layers run as HF's own modules."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moedpo.data.collate import collate, collate_shared
from moedpo.evaluate import batch_logps
from moedpo.models.moe import apply_moe_implementation, experts_modules

COMMON = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64)
DEEPSEEK_STYLE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1)
FAMILIES = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(**DEEPSEEK_STYLE, num_key_value_heads=4, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=8),
    "glm4_moe": DEEPSEEK_STYLE,
    # Biased, transposed experts with gate and up interleaved and a clamped SwiGLU; attention
    # sinks; sliding and full attention layers.
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
}


def build(family: str) -> torch.nn.Module:
    """A tiny random model of `family` on HF's eager experts, every expert weight and bias
    drawn large enough that each expert's output matters."""
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    model.set_experts_implementation("eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.normal_(0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def logits_and_grads(model, ids, mask, targets):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    (logps * mask).sum().backward()
    return logits * mask[..., None], {n: p.grad for n, p in model.named_parameters()
                                      if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_experts_implementations_equal_hugging_face(family):
    model = build(family)
    experts = experts_modules(model)
    assert experts, family
    top_k = model.config.num_experts_per_tok
    factor = experts[0].down_proj.shape[0] / top_k  # E/k: room for every claim
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (3, 10), generator=gen)
    targets = torch.randint(0, 512, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    hf_logits, hf_grads = logits_and_grads(model, ids, mask, targets)
    for impl, cf in (("dropless", 0.0), ("dense", 0.0), ("dropped", factor)):
        ours = copy.deepcopy(model)
        apply_moe_implementation(ours, impl, cf)
        logits, grads = logits_and_grads(ours, ids, mask, targets)
        torch.testing.assert_close(logits, hf_logits, atol=1e-5, rtol=1e-5, msg=impl)
        assert grads.keys() == hf_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, hf_grads[name], atol=1e-5, rtol=1e-4,
                                       msg=f"{impl} {name}")
        expert_grads = [n for n in grads if ".experts." in n]
        assert expert_grads and all(grads[n].abs().sum() > 0 for n in expert_grads), impl


def test_gpt_oss_shared_prompt_rows_equal_plain_rows():
    """gpt-oss's sliding and full layers (and sinks) with the shared-prompt mask: the
    per-sequence log-prob sums equal the unshared rows'."""
    from conftest import random_pairs

    model = build("gpt_oss")
    apply_moe_implementation(model, "dropless")
    pairs = random_pairs(4, seed=2)
    plain, _ = batch_logps(model, collate(pairs, pad_id=0), -100)
    shared, _ = batch_logps(model, collate_shared(pairs, pad_id=0), -100)
    torch.testing.assert_close(shared.logps, plain.logps, atol=1e-5, rtol=1e-5)


def test_ungated_experts_equal_hugging_face():
    """Nemotron-H's ungated experts (up_proj, act_fn, down_proj; `has_gate=False`): each of
    moedpo's implementations equals the module's own forward, outputs and gradients."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    from moedpo.models import moe

    config = NemotronHConfig(hidden_size=16, moe_intermediate_size=24, n_routed_experts=4,
                             num_experts_per_tok=2)
    torch.manual_seed(3)
    experts = NemotronHExperts(config).double()
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.3)
    assert not experts.has_gate
    hidden = torch.randn(9, 16, dtype=torch.double)
    index = torch.stack([torch.randperm(4)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, dtype=torch.double)
    experts.moedpo_capacity_factor = 2.0  # E/k

    def run(forward):
        module, x, w = copy.deepcopy(experts), hidden.clone().requires_grad_(), weights.clone()
        w.requires_grad_()
        out = forward(module, x, index, w)
        out.pow(2).sum().backward()
        return out, x.grad, w.grad, module.up_proj.grad, module.down_proj.grad

    config._experts_implementation = "eager"
    expected = run(lambda m, *a: m(*a))
    for forward in (moe.dropless_experts_forward, moe.dense_experts_forward,
                    moe.dropped_experts_forward):
        for got, want in zip(run(forward), expected, strict=True):
            torch.testing.assert_close(got, want, msg=forward.__name__)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_bf16_experts_err_no_more_than_hugging_face(family):
    """In bfloat16 (as real runs compute), biased/transposed and sigmoid-routed families: the
    dropless experts' logits are as close to the float32 model's as HF's own bf16 forward."""
    model = build(family)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        exact = model(input_ids=ids).logits
        hf = copy.deepcopy(model).to(torch.bfloat16)
        ours = copy.deepcopy(hf)
        apply_moe_implementation(ours, "dropless")
        hf_err = (hf(input_ids=ids).logits.float() - exact).abs().max()
        our_err = (ours(input_ids=ids).logits.float() - exact).abs().max()
    assert hf_err > 0
    assert our_err <= 1.5 * hf_err + 1e-3


# Each family with train-mode noise set: moedpo turns off only the noise (models/load.py's
# TRAIN_NOISE), never a setting the eval forward reads (PhiMoE's router_jitter_noise is its
# sparsemixer's selection threshold).
NOISY = {**{f: {} for f in FAMILIES},
         "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.5),
         "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.3,
                        input_jitter_noise=0.5)}


@pytest.mark.parametrize("family", list(NOISY))
def test_load_turns_off_train_noise_only_and_keeps_the_eval_forward(family, tmp_path):
    import json

    from moedpo.config import ModelConfig
    from moedpo.models.families import SAMPLED_ROUTERS, TRAIN_NOISE
    from moedpo.models.load import build_models

    fields = {**COMMON, **FAMILIES.get(family, {}), **NOISY[family]}
    config = AutoConfig.for_model(family, **fields)
    for key in TRAIN_NOISE.get(family, ()):  # the table names real settings of the family
        assert isinstance(getattr(config, key), float), (family, key)
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps({**config.to_diff_dict(), "model_type": family}))
    policy, reference = build_models(ModelConfig(config_path=str(path), policy_dtype="float32",
                                                 reference_dtype="float32", flash_attention=False))
    hf = build(family) if family in FAMILIES else None
    if hf is None:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    hf.config = config  # the family's own settings, noise and thresholds as given
    for layer in hf.modules():  # modules copied the settings when built
        for key, value in fields.items():
            if hasattr(layer, key) and key not in ("hidden_size", "head_dim"):
                setattr(layer, key, value)
    policy.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(policy.eval()(input_ids=ids).logits,
                                   hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        policy.train()  # no noise left in train mode: the policy starts as the reference
        if family in SAMPLED_ROUTERS:
            routers = [m for m in policy.modules() if type(m).__name__ == SAMPLED_ROUTERS[family]]
            assert routers and not any(m.training for m in routers)
        torch.testing.assert_close(policy(input_ids=ids).logits, policy(input_ids=ids).logits)
        reference.load_state_dict(hf.state_dict())
        torch.testing.assert_close(policy(input_ids=ids).logits,
                                   reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
