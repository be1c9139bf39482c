"""LoRA through PEFT (model.lora): the reference is the base, only adapters train, expert
adapters are a per-expert low-rank update of each expert's weights."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from conftest import compose_cfg, final_weights, random_pairs, tiny_train_overrides, train_rows
from moedpo.config import ConfigError, ModelConfig
from moedpo.data.collate import collate
from moedpo.models import lora
from moedpo.models.load import build_models
from moedpo.models.router import router_modules
from moedpo.step import batch_loss
from moedpo.trainer import run
from moedpo.validate import validate


def lora_model(**lora_fields) -> ModelConfig:
    cfg = ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                      reference_dtype="float32")
    cfg.lora.r = 4
    for key, value in lora_fields.items():
        setattr(cfg.lora, key, value)
    return cfg


def randomise_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.05


def test_reference_is_the_base_and_the_policy_starts_as_it():
    ids = torch.randint(0, 500, (2, 10))
    base, _ = build_models(ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                                       reference_dtype="float32"), seed=3, with_reference=False)
    policy, reference = build_models(lora_model(), seed=3)
    assert isinstance(reference, lora.AdaptersOff)
    with torch.no_grad():
        want = base(input_ids=ids).logits
        assert torch.equal(reference(input_ids=ids).logits, want)
        assert torch.equal(policy(input_ids=ids).logits, want)  # B = 0: W + 0 exactly
        randomise_adapters(policy)
        assert (policy(input_ids=ids).logits - want).abs().max() > 1e-3
        assert torch.equal(reference(input_ids=ids).logits, want)
    reference.eval()
    assert policy.training  # the reference's mode is not the policy's


def test_only_adapters_get_gradients_and_the_routers_stay_frozen():
    cfg = compose_cfg("model=tiny", "model.lora.r=4")
    policy, reference = build_models(cfg.model, seed=0)
    randomise_adapters(policy)  # B != 0, so the A factors get gradients too
    out = batch_loss(policy, reference, collate(random_pairs(4), pad_id=1), cfg)
    out.loss.backward()
    with_grad = {n for n, p in policy.named_parameters() if p.grad is not None}
    adapters = {n for n, p in policy.named_parameters() if "lora_" in n}
    assert with_grad == adapters
    assert any("experts" in n for n in adapters) and any("q_proj" in n for n in adapters)
    assert all(policy.get_parameter(n).grad.abs().sum() > 0 for n in adapters)
    assert all(not p.requires_grad for r in router_modules(policy) for p in r.parameters())


def test_default_targets_are_attention_and_dense_mlp_projections(tiny_neox_dir):
    mixtral, _ = build_models(lora_model(r=0), with_reference=False)
    assert lora.default_target_modules(mixtral) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert lora.expert_parameters(mixtral) == ["experts.down_proj", "experts.gate_up_proj"]
    dense, _ = build_models(ModelConfig(name_or_path=str(tiny_neox_dir), policy_dtype="float32",
                                        reference_dtype="float32"), with_reference=False)
    assert lora.default_target_modules(dense) == ["dense", "dense_4h_to_h", "dense_h_to_4h",
                                                  "query_key_value"]
    assert lora.expert_parameters(dense) == []


def hand_experts(x, index, weights, w_first, w_down, adapters, scale):
    """Every token through its top-k experts, each expert's weights W_e + scale * B_e A_e
    with A_e, B_e cut from PEFT's stacked factors: A [E*r, in] row-blocks by expert,
    B [out, r*E] with the expert fastest (PEFT's layout, get_delta_weight)."""
    def adapted(weight, a, b):
        experts, rank = weight.shape[0], a.shape[0] // weight.shape[0]
        a_e = a.view(experts, rank, -1)
        b_e = b.view(b.shape[0], rank, experts).permute(2, 0, 1)
        return weight + scale * b_e @ a_e
    first = adapted(w_first, *adapters["gate_up_proj"])
    down = adapted(w_down, *adapters["down_proj"])
    out = torch.zeros_like(x)
    inter = down.shape[-1]
    for t in range(x.shape[0]):
        for e, w in zip(index[t].tolist(), weights[t], strict=True):
            h = first[e] @ x[t]
            out[t] += w * (down[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


@pytest.mark.parametrize("implementation", ["dropless", "dense", "dropped"])
def test_expert_adapters_are_a_per_expert_low_rank_update_float64(implementation):
    cfg = lora_model(alpha=8.0)
    cfg.moe_implementation = implementation
    if implementation == "dropped":
        cfg.capacity_factor = 4.0  # E / k: nothing dropped
    policy, _ = build_models(cfg, seed=1, with_reference=False)
    policy.double()
    randomise_adapters(policy, seed=2)
    block = policy.base_model.model.model.layers[0].mlp
    experts = block.experts  # PEFT's ParamWrapper around the fused experts
    base = experts.get_base_layer()
    torch.manual_seed(4)
    tokens, hidden = 6, base.gate_up_proj.shape[-1]
    x = torch.randn(tokens, hidden, dtype=torch.double)
    index = torch.stack([torch.randperm(base.gate_up_proj.shape[0])[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, dtype=torch.double)
    got = experts(x, index, weights)

    layers = {w.parameter_name: w for w in experts.modules()
              if isinstance(w, LoraLayer) and hasattr(w, "parameter_name")}
    factors = {name: (w.lora_A["default"].weight, w.lora_B["default"].weight)
               for name, w in layers.items()}
    scale = layers["down_proj"].scaling["default"]
    assert scale == pytest.approx(8.0 / 4)
    leaves = {k: (a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_())
              for k, (a, b) in factors.items()}
    want = hand_experts(x, index, weights, base.gate_up_proj.detach(), base.down_proj.detach(),
                        leaves, scale)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        plain = hand_experts(x, index, weights, base.gate_up_proj, base.down_proj,
                             {k: (torch.zeros_like(a), b) for k, (a, b) in factors.items()}, 0)
    assert (got - plain).abs().max() > 1e-3  # the adapters change what the experts compute
    probe = torch.randn_like(x)
    (got * probe).sum().backward()
    (want * probe).sum().backward()
    for name, (a, b) in factors.items():
        torch.testing.assert_close(a.grad, leaves[name][0].grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.grad, leaves[name][1].grad, rtol=1e-10, atol=1e-12)


def test_lora_dpo_starts_at_ln2_and_learns_the_demo(make_cfg):
    result = run(make_cfg(*tiny_train_overrides(), "max_steps=10", "eval_frequency=5",
                          "per_device_train_batch_size=8", "model.lora.r=8",
                          "model.lora.alpha=16"))
    evals = [r for r in train_rows(result.run_dir) if "eval/loss" in r]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval/rewards/margins"] > 0.05
    assert evals[-1]["eval/rewards/accuracies"] > 0.6
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.02


def test_trained_router_under_lora_moves_a_copy_the_reference_does_not_use(make_cfg):
    """model.freeze_router=false under LoRA: PEFT keeps a trainable copy of each router
    (modules_to_save). The copies train and the checkpoint holds them; the original routers,
    which the reference (adapters off) runs, stay as they were, so step 0 is ln 2 and the
    reference's logits after training are the base model's."""
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=4", "model.lora.r=4", "lr=3e-3",
                   "model.freeze_router=false", "checkpoint.save_frequency=4")
    plain = copy.deepcopy(cfg.model)
    plain.lora.r = 0
    base, _ = build_models(plain, cfg.seed, with_reference=False)
    result = run(cfg)
    evals = [r for r in train_rows(result.run_dir) if "eval/loss" in r]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    named = dict(result.policy.named_parameters())
    copies = {n: p for n, p in named.items() if "modules_to_save" in n}
    originals = {n: p for n, p in named.items() if "original_module" in n}
    assert copies and len(copies) == len(originals)
    assert all(p.requires_grad for p in copies.values())
    assert not any(p.requires_grad for p in originals.values())
    start = dict(base.named_parameters())
    moved = [(p.detach() - start[n.replace("base_model.model.", "").replace(
        ".modules_to_save.default", "")]).abs().max().item() for n, p in copies.items()]
    assert min(moved) > 1e-5  # every router copy trained
    for n, p in originals.items():
        torch.testing.assert_close(p.detach(), start[n.replace("base_model.model.", "").replace(
            ".original_module", "")], rtol=0, atol=0)
    ids = torch.randint(0, 500, (2, 10))
    with torch.no_grad():
        reference = lora.AdaptersOff(result.policy)
        assert torch.equal(reference(input_ids=ids).logits, base(input_ids=ids).logits)
        assert (result.policy(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4
    saved = final_weights(result.run_dir / "checkpoints")
    assert any("modules_to_save" in k for k in saved)
    assert all("lora_" in k or "modules_to_save" in k for k in saved)


@pytest.mark.parametrize("setting,message", [
    ("reference.sync_every=2", "TR-DPO"),
    ("model.router_bias_update_rate=0.001", "correction biases"),
    ("model.lora.quantize=8bit", "4bit or null"),
    ("model.lora.r=-1", "must be >= 0"),
    ("model.lora.dropout=1.5", "[0, 1)"),
])
def test_settings_lora_cannot_take_are_one_line_errors(make_cfg, setting, message):
    extra = [] if setting.startswith("model.lora.r=") else ["model.lora.r=4"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        validate(make_cfg("+experiment=demo", *extra, setting))


def test_expert_dropout_and_quantization_are_refused_when_built():
    with pytest.raises(ConfigError, match="target_experts"):
        build_models(lora_model(dropout=0.1), with_reference=False)
    policy, _ = build_models(lora_model(dropout=0.1, target_experts=False),
                             with_reference=False)
    assert not any("experts" in n for n, _ in policy.named_parameters() if "lora_" in n)


# full_logits in the slow tier: packed, in the fast one, runs the same LoRA comparison.
@pytest.mark.parametrize("layout", [
    pytest.param(["data.packing=true", "data.max_tokens_per_row=160"], id="packed"),
    pytest.param(["model.logps_chunk_size=0"], id="full_logits", marks=pytest.mark.slow)])
def test_lora_training_equals_plain_rows_with_the_fast_paths(make_cfg, tmp_path, layout):
    """LoRA with the shared prompt and chunked head (the defaults), packed rows, or full
    logits trains as plain unshared rows do."""
    from conftest import assert_same_run

    common = [*tiny_train_overrides(), "max_steps=4", "shuffle=true", "model.lora.r=4",
              "lr=3e-3"]
    run(make_cfg(*common, "exp_name=plain", "data.share_prompt=false"))
    run(make_cfg(*common, "exp_name=fast", *layout))
    assert_same_run(tmp_path / "plain", tmp_path / "fast", atol=1e-5, rel=1e-4)


@pytest.mark.parametrize("implementation", ["dropless", "dense", "dropped"])
def test_expert_adapters_run_beside_the_base_weights_without_a_folded_copy(implementation):
    """moedpo's experts read PEFT's factors and add x A_e^T B_e^T beside x W_e^T: autograd
    keeps no tensor the size of an expert stack other than the stored weights themselves
    (PEFT's own fold would keep W + s B A, a new full-size copy, for every forward)."""
    cfg = lora_model(alpha=8.0)
    cfg.moe_implementation = implementation
    if implementation == "dropped":
        cfg.capacity_factor = 2.0
    policy, _ = build_models(cfg, seed=1, with_reference=False)
    randomise_adapters(policy, seed=2)
    base = policy.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    stored = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    stack_sizes = {base.gate_up_proj.numel(), base.down_proj.numel()}
    full_size = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.numel() in stack_sizes and t.untyped_storage().data_ptr() not in stored:
            full_size.append(tuple(t.shape))
        return t

    ids = torch.randint(0, 500, (2, 12))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = policy(input_ids=ids).logits.float().pow(2).mean()
    loss.backward()
    assert full_size == []
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in policy.named_parameters() if "experts" in n and "lora_" in n)
    assert base.gate_up_proj.grad is None and base.down_proj.grad is None


def test_gpt_oss_expert_adapters_in_its_transposed_biased_layout():
    """gpt-oss stores its experts [E, in, out] with biases: the adapters there give the
    reference the base's logits, train, and compute what PEFT's own merge folds in."""
    cfg = ModelConfig(config_path="tiny-gpt-oss.json", policy_dtype="float32",
                      reference_dtype="float32")
    cfg.lora.r = 4
    base, _ = build_models(ModelConfig(config_path="tiny-gpt-oss.json", policy_dtype="float32",
                                       reference_dtype="float32"), seed=2, with_reference=False)
    policy, reference = build_models(cfg, seed=2)
    assert lora.expert_parameters(base) == ["experts.down_proj", "experts.gate_up_proj"]
    randomise_adapters(policy, seed=5)
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        assert torch.equal(reference(input_ids=ids).logits, want)
        got = policy(input_ids=ids).logits
        assert (got - want).abs().max() > 1e-3
        merged = copy.deepcopy(policy).merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, got, rtol=1e-5, atol=1e-5)
    policy(input_ids=ids).logits.sum().backward()
    expert_grads = [p.grad for n, p in policy.named_parameters()
                    if "experts" in n and "lora_" in n]
    assert expert_grads and all(g is not None and g.abs().sum() > 0 for g in expert_grads)


# Slow tier: a bf16 LoRA run; LoRA's start at ln 2, its training and the bf16 masters stay fast.
@pytest.mark.slow
def test_bf16_lora_keeps_float32_adapter_masters_and_moves_them_at_a_dpo_lr(make_cfg):
    """A bf16 policy under mixed precision: the frozen base stays bf16 (no master), the
    adapters keep float32 masters, step 0 is ln 2 (the bf16 reference is the bf16 base),
    and updates at lr 5e-6 reach the adapters rather than rounding away."""
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=3", "model.lora.r=4", "lr=5e-6",
                   "model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16")
    start, _ = build_models(cfg.model, cfg.seed, with_reference=False)
    dtypes = {p.dtype for p in start.parameters() if p.requires_grad}
    frozen = {p.dtype for p in start.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    result = run(cfg)
    evals = [r for r in train_rows(result.run_dir) if "eval/loss" in r]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    before = {n: p for n, p in start.named_parameters() if "lora_B" in n}
    after = dict(result.policy.named_parameters())
    moved = [(after[n].detach() - p).abs().max().item() for n, p in before.items()]
    assert min(moved) > 1e-6  # every B moved (B starts at 0; Adam steps ~lr)


@pytest.mark.parametrize("meta", [False, True], ids=["loaded", "meta_init"])
def test_lora_reads_its_base_from_a_full_models_checkpoint(make_cfg, tmp_path, meta):
    """checkpoint_manager_path under LoRA: the checkpoint holds the plain model's keys; the
    PeftModel's base weights (and a trained router copy's) read them, the adapters keep their
    initialisation (B = 0: the policy starts as the checkpoint's model). With meta init the
    model is built weightless first and filled from the checkpoint the same way."""
    import torch as t

    from moedpo.checkpoint import save_weights
    from moedpo.parallel import make_strategy
    from moedpo.parallel.backend import Backend
    from moedpo.placement import load_models

    saved, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                        policy_dtype="float32"), seed=5, with_reference=False)
    save_weights(saved, str(tmp_path / "weights"))
    cfg = make_cfg("+experiment=demo", "model.lora.r=4", "model.freeze_router=false",
                   f"checkpoint_manager_path={tmp_path / 'weights'}",
                   f"model.meta_init={str(meta).lower()}")
    _, policy, reference = load_models(cfg, make_strategy(cfg, Backend("cpu", t.device("cpu"))))
    ids = t.randint(0, 500, (2, 10))
    with t.no_grad():
        want = saved(input_ids=ids).logits
        t.testing.assert_close(reference(input_ids=ids).logits, want, rtol=0, atol=0)
        t.testing.assert_close(policy(input_ids=ids).logits, want, rtol=0, atol=0)
    copies = [p for n, p in policy.named_parameters() if "modules_to_save" in n]
    assert copies and all(p.requires_grad for p in copies)
    router = dict(saved.named_parameters())["model.layers.0.mlp.gate.weight"]
    copy0 = dict(policy.named_parameters())[
        "base_model.model.model.layers.0.mlp.gate.modules_to_save.default.weight"]
    assert t.equal(copy0, router)
    adapters_a = [p for n, p in policy.named_parameters() if "lora_A" in n]
    assert adapters_a and all(p.abs().sum() > 0 for p in adapters_a)  # initialised, not read


@pytest.mark.parametrize("experts", [True, False])
def test_target_modules_that_name_nothing_are_one_line(experts):
    """A typo in target_modules trained the experts alone (or raised PEFT's traceback)."""
    with pytest.raises(ConfigError, match="model.lora.target_modules: 'nonexistent_proj' names "
                       "no module of MixtralForCausalLM; its linear layers are .*q_proj"):
        build_models(lora_model(target_modules=["nonexistent_proj"], target_experts=experts))
    policy, _ = build_models(lora_model(target_modules=["self_attn.q_proj"],
                                        target_experts=False), with_reference=False)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in policy.named_parameters()
               if "lora_" in n}
    assert adapted == {"q_proj"}
