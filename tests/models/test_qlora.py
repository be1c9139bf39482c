"""QLoRA (model.lora.quantize=4bit): the base loads as bitsandbytes NF4 (the head and routers
kept), the reference is that quantized base with the adapters off, and LoRA DPO trains on it
(bitsandbytes' CPU kernels here; CUDA on GPUs)."""

import math

import pytest
import torch

from conftest import tiny_train_overrides, train_rows
from moedpo.config import ConfigError, ModelConfig
from moedpo.models.load import build_models
from moedpo.models.router import router_modules
from moedpo.trainer import run
from moedpo.validate import validate


def bitsandbytes():
    """bitsandbytes, or a skip with the reason: without it the tests that run QLoRA skip
    and the rest of the suite (and the refusal tests here) still collect and run."""
    return pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install "
                               "'moedpo[qlora]'")


def qlora_model(folder, **lora_fields) -> ModelConfig:
    cfg = ModelConfig(name_or_path=str(folder), policy_dtype="bfloat16",
                      reference_dtype="bfloat16")
    cfg.lora.r, cfg.lora.quantize = 4, "4bit"
    for key, value in lora_fields.items():
        setattr(cfg.lora, key, value)
    return cfg


def test_base_is_nf4_but_head_routers_and_experts_and_the_reference_is_it(tiny_mixtral_dir):
    bnb = bitsandbytes()
    policy, reference = build_models(qlora_model(tiny_mixtral_dir), seed=0)
    base = policy.base_model.model
    attention = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(attention, bnb.nn.Linear4bit) and attention.weight.dtype == torch.uint8
    assert attention.weight.quant_state.quant_type == "nf4"
    # two 4-bit weights a byte: a quarter of the bf16 bytes (plus small per-block statistics)
    assert attention.weight.numel() * 2 == attention.in_features * attention.out_features
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert all(not isinstance(m, bnb.nn.Linear4bit) for r in router_modules(policy)
               for m in r.modules())
    experts = base.model.layers[0].mlp.experts.get_base_layer()
    assert experts.gate_up_proj.dtype == torch.bfloat16  # no nn.Linear: left in policy_dtype
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for n, p in policy.named_parameters() if n in trainable} == {torch.float32}

    unquantized, _ = build_models(ModelConfig(name_or_path=str(tiny_mixtral_dir),
                                              policy_dtype="bfloat16"), with_reference=False)
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        assert torch.equal(policy(input_ids=ids).logits, want)  # B = 0 at the start
        full = unquantized(input_ids=ids).logits
    # NF4 rounds the weights: near the bf16 model, not it
    assert 0 < (want.float() - full.float()).abs().max() < 0.5 * full.float().abs().max()


# Slow tier: a QLoRA training run; the NF4 build, its reference by hand and its export stay fast.
@pytest.mark.slow
def test_qlora_dpo_starts_at_ln2_and_learns_the_demo(make_cfg, tiny_mixtral_dir):
    bitsandbytes()
    result = run(make_cfg(*tiny_train_overrides(), "max_steps=10", "eval_frequency=5",
                          "per_device_train_batch_size=8", "model.lora.r=8",
                          "model.lora.alpha=16", "model.lora.quantize=4bit",
                          f"model.name_or_path={tiny_mixtral_dir}", "model.config_path=null",
                          "model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16"))
    evals = [r for r in train_rows(result.run_dir) if "eval/loss" in r]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval/rewards/margins"] > 0.05
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.02


def test_export_puts_qlora_adapters_on_the_unquantized_base(make_cfg, tiny_mixtral_dir,
                                                          tmp_path):
    """`moedpo export --merge` of a QLoRA run: the adapters merged into the bf16 base, a
    plain HF model with no 4-bit layer, equal to PEFT's own adapter-on-base."""
    bnb = bitsandbytes()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from moedpo.export import export

    result = run(make_cfg(*tiny_train_overrides(), "lr=3e-3", "model.lora.r=4",
                          "model.lora.quantize=4bit", f"model.name_or_path={tiny_mixtral_dir}",
                          "model.config_path=null", "model.policy_dtype=float32",
                          "model.reference_dtype=float32"))
    export(result.run_dir, tmp_path / "adapter")
    export(result.run_dir, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    base = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, adapted(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with adapted.disable_adapter():  # and the adapters trained away from the base
            assert (want - adapted(input_ids=ids).logits).abs().max() > 1e-4


@pytest.mark.parametrize("setting, message", [
    ("model.config_path=tiny-mixtral.json", "QLoRA quantizes pretrained weights"),
    ("model.meta_init=true", "quantized as it loads whole"),
    ("parallel.backend=xla", "no XLA kernels"),
])
def test_qlora_refusals(make_cfg, tiny_mixtral_dir, setting, message):
    base = [] if setting.startswith("model.config_path") else \
        [f"model.name_or_path={tiny_mixtral_dir}", "model.config_path=null"]
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg("+experiment=demo", "model.lora.r=4", "model.lora.quantize=4bit",
                          *base, setting))


def test_qlora_without_bitsandbytes_says_how_to_install(make_cfg, tiny_mixtral_dir,
                                                        monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'moedpo\[qlora\]'"):
        validate(make_cfg("+experiment=demo", "model.lora.r=4", "model.lora.quantize=4bit",
                          f"model.name_or_path={tiny_mixtral_dir}", "model.config_path=null"))



def test_qlora_under_torchrun_is_refused_before_loading(make_cfg, tiny_mixtral_dir,
                                                        monkeypatch):
    """validate refuses it where torchrun launched several processes, before any model
    loads; one process is fine."""
    import moedpo.validate as validate_module

    cfg = make_cfg("+experiment=demo", "model.lora.r=4", "model.lora.quantize=4bit",
                   f"model.name_or_path={tiny_mixtral_dir}", "model.config_path=null")
    validate_module.check_placement(cfg)
    monkeypatch.setattr(validate_module, "launched_processes", lambda: 2)
    with pytest.raises(ConfigError, match="FSDP2 cannot shard bitsandbytes' 4-bit weights"):
        validate_module.validate(cfg)


def test_qlora_reference_equals_the_dequantized_base_computed_by_hand(tiny_mixtral_dir):
    """An independent check of the 4-bit reference at run time: each NF4 weight dequantized
    with bitsandbytes' own `dequantize_4bit` and put into a plain bf16 model; its logits are
    the QLoRA reference's."""
    bnb = bitsandbytes()
    policy, reference = build_models(qlora_model(tiny_mixtral_dir), seed=0)
    plain, _ = build_models(ModelConfig(name_or_path=str(tiny_mixtral_dir),
                                        policy_dtype="bfloat16", mixed_precision=False),
                            with_reference=False)
    quantized = {name.removeprefix("base_model.model.").replace(".base_layer", ""): module
                 for name, module in policy.named_modules()
                 if isinstance(module, bnb.nn.Linear4bit)}
    assert quantized
    with torch.no_grad():
        for name, module in quantized.items():
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain.get_submodule(name).weight.copy_(weight.to(torch.bfloat16))
        ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
        got = reference(input_ids=ids).logits.float()
        want = plain(input_ids=ids).logits.float()
    # Equal here (0.0 measured); the unquantized base is 0.19 away on the same ids.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
