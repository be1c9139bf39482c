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
from moedpo.models import families
from moedpo.models.moe import apply_moe_implementation, experts_modules
from moedpo.step import batch_logps

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


# The tables of moedpo/models/families.py, each entry checked against the family's behaviour
# on a tiny model built from its config class (beyond COMMON, what each family needs for that).
TINY = {**FAMILIES,
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
        "minimax": dict(num_local_experts=4, num_experts_per_tok=2),
        "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2),
        "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2),
        "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2),
        "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
        "dots1": DEEPSEEK_STYLE,
        "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                            v_head_dim=8, num_key_value_heads=4),
        "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16),
        "flex_olmo": dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0),
        "phi3": dict(pad_token_id=0), "smollm3": dict(pad_token_id=0)}


def tiny(family: str, **extra) -> torch.nn.Module:
    config = AutoConfig.for_model(family, **{**COMMON, **TINY.get(family, {}), **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                            attn_implementation="eager").eval()


@pytest.mark.parametrize("family", sorted(families.HEAD_LOGITS))
def test_head_logits_table_entry_gives_the_full_logits_log_probs(family):
    """Log-probs from the head in chunks (with the family's LogitTransform) equal the ones
    from the family's own full logits."""
    from conftest import random_pairs
    from moedpo.models import chunked_head

    model = tiny(family)
    batch = collate(random_pairs(3, seed=1), pad_id=0)
    chunked = copy.deepcopy(model)
    assert chunked_head.enable(chunked, 7)
    with torch.no_grad():
        want, _ = batch_logps(model, batch, -100)
        got, _ = batch_logps(chunked, batch, -100)
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-4)


def layer_masks(length: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive causal 4-D masks for a batch of 2: full, and sliding over `window` tokens."""
    i = torch.arange(length)
    causal = i[:, None] >= i[None, :]
    slide = causal & (i[:, None] - i[None, :] < window)
    blocked = torch.finfo(torch.float32).min
    return tuple(torch.zeros(length, length).masked_fill(~a, blocked)[None, None].expand(
        2, 1, length, length) for a in (causal, slide))


@pytest.mark.parametrize("family", sorted(families.MASK_PER_LAYER_TYPE))
def test_mask_per_layer_type_table_entry_takes_the_mapping_per_layer(family):
    """Given {layer type: mask}, the model equals its own causal/sliding masking, and swapping
    the two masks changes it: each layer reads the mask of its own type."""
    config = AutoConfig.for_model(family, **COMMON)
    extra = dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"])
    if hasattr(config, "use_sliding_window"):  # Qwen2-style: windows only where switched on
        extra.update(use_sliding_window=True, max_window_layers=1)
    model = tiny(family, **extra)
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    full, sliding = layer_masks(10, 3)
    with torch.no_grad():
        own = model(input_ids=ids).logits
        mapped = model(input_ids=ids, attention_mask={"full_attention": full,
                                                      "sliding_attention": sliding}).logits
        swapped = model(input_ids=ids, attention_mask={"full_attention": sliding,
                                                       "sliding_attention": full}).logits
    torch.testing.assert_close(mapped, own, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swapped, own, atol=1e-3)


@pytest.mark.parametrize("family", sorted(families.ROUTER_SCORES))
def test_router_scores_table_entry_is_how_the_router_weighs_experts(family):
    """The ratio of a token's two chosen experts' weights is exp(l1 - l2) for a softmax
    router and sigmoid(l1) / sigmoid(l2) for a sigmoid one (normalising and scaling the top-k
    keep ratios), from the router's own (logits, weights, indices) output."""
    from moedpo.models.router import record_router_logits, router_modules

    model = tiny(family)
    if family in families.SAMPLED_ROUTERS:  # its sparsemixer masks a softmax per choice
        assert families.ROUTER_SCORES[family] == "softmax"
        return
    outputs = []
    router_modules(model)[0].register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad(), record_router_logits(model) as record:
        model(input_ids=torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1)))
    assert record.scores and set(record.scores) == {families.ROUTER_SCORES[family]}
    logits, weights, chosen = outputs[0][:3]
    logits = logits.reshape(-1, logits.shape[-1])
    weights, chosen = weights.reshape(logits.shape[0], -1), chosen.reshape(logits.shape[0], -1)
    if weights.shape[-1] == logits.shape[-1]:  # scores over all experts: take the chosen
        weights = weights.gather(-1, chosen)
    picked = logits.gather(-1, chosen)
    score = torch.exp if families.ROUTER_SCORES[family] == "softmax" else torch.sigmoid
    ratio = score(picked[:, 0] - picked[:, 1]) if score is torch.exp else \
        score(picked[:, 0]) / score(picked[:, 1])
    torch.testing.assert_close(weights[:, 0] / weights[:, 1], ratio, rtol=1e-4, atol=1e-6)
    other = torch.sigmoid(picked[:, 0]) / torch.sigmoid(picked[:, 1]) if score is torch.exp \
        else torch.exp(picked[:, 0] - picked[:, 1])
    assert not torch.allclose(weights[:, 0] / weights[:, 1], other, rtol=1e-3)


def test_a_family_missing_from_the_tables_gets_the_safe_path_and_says_so(caplog):
    """Remote code or a user's subclass is not in any table, whatever its model_type."""
    from transformers import MixtralConfig, MixtralForCausalLM

    class Custom(MixtralForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = Custom(MixtralConfig(**{**COMMON, **TINY["mixtral"]}))
    assert families.family(tiny("mixtral")) == "mixtral" and families.family(model) is None
    with caplog.at_level("INFO"):
        assert families.router_score(model) == "softmax"
        assert not families.takes_mask_per_layer_type(model)
        assert not families.head_logits_known(model)
    assert caplog.text.count("is not in moedpo's table") == 3
    model.config.scoring_func = "sigmoid"  # a config that says so publicly is believed
    assert families.router_score(model) == "sigmoid"
