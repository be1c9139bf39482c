import gc
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import offline
from moedpo.config import ModelConfig, resolve_model_json
from moedpo.models.load import (
    ModelLoadError,
    build_models,
    initial_model,
    load_tokenizer,
    materialize,
)

TINY = dict(config_path="tiny-mixtral.json")


def test_random_init_covers_every_weight_and_rmsnorm_is_one():
    policy, _ = build_models(ModelConfig(**TINY, policy_dtype="float32"), seed=0)
    for name, param in policy.named_parameters():
        assert torch.isfinite(param).all(), name
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert 0.01 < param.std().item() < 0.03, name  # initializer_range 0.02


def test_policy_and_reference_identical_then_each_in_own_dtype():
    policy, reference = build_models(ModelConfig(**TINY, policy_dtype="float32",
                                                 reference_dtype="bfloat16"), seed=0)
    assert not reference.training and policy.training
    ref_params = dict(reference.named_parameters())
    for name, param in policy.named_parameters():
        assert param.dtype == torch.float32 and ref_params[name].dtype == torch.bfloat16
        assert not ref_params[name].requires_grad and param.requires_grad
        assert torch.equal(param.to(torch.bfloat16), ref_params[name]), name


def test_same_seed_same_model_other_seed_differs():
    a, _ = build_models(ModelConfig(**TINY, policy_dtype="float32"), seed=0)
    b, _ = build_models(ModelConfig(**TINY, policy_dtype="float32"), seed=0)
    c, _ = build_models(ModelConfig(**TINY, policy_dtype="float32"), seed=1)
    wa, wb, wc = (m.lm_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_pretrained_folder_loads_with_dropout_off(tiny_neox_dir):
    cfg = ModelConfig(name_or_path=str(tiny_neox_dir), policy_dtype="float32",
                      reference_dtype="float32")
    policy, reference = build_models(cfg)
    assert type(policy).__name__ == "GPTNeoXForCausalLM"
    dropouts = [m.p for m in policy.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(p == 0.0 for p in dropouts)
    ids = torch.randint(0, 500, (2, 9))
    policy.train()
    torch.testing.assert_close(policy(input_ids=ids).logits, policy(input_ids=ids).logits)
    torch.testing.assert_close(policy(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc")
@pytest.mark.parametrize("folder", ["tiny_neox_dir", "tiny_mixtral_dir"])
def test_loaded_weights_own_their_memory_and_the_file_is_unmapped(folder, request):
    """from_pretrained leaves the tensors it did not convert inside the memory-mapped
    safetensors file, which keeps every page it read resident; initial_model copies them."""
    folder = request.getfixturevalue(folder)
    weights = folder / "model.safetensors"
    cfg = ModelConfig(name_or_path=str(folder), policy_dtype="float32",
                      reference_dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    mapped = [t for t in model.state_dict().values() if not t.untyped_storage().resizable()]
    assert mapped, "transformers no longer maps the file: own_storage has nothing to do"
    del model, mapped
    gc.collect()

    model = initial_model(cfg)
    gc.collect()
    assert str(weights) not in Path("/proc/self/maps").read_text()
    assert all(t.untyped_storage().resizable() for t in model.state_dict().values())
    on_disk = load_file(weights)
    for name, tensor in model.state_dict().items():
        if name in on_disk:
            assert torch.equal(tensor, on_disk[name]), name


def test_tokenizer_sources(tiny_neox_dir):
    embedded = load_tokenizer(ModelConfig(**TINY))
    assert embedded.pad_token == "<|pad|>" and embedded.eos_token == "<|endoftext|>"
    from_model = load_tokenizer(ModelConfig(name_or_path=str(tiny_neox_dir)))
    assert len(from_model) == len(embedded)


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    offline(monkeypatch)
    with pytest.raises(ModelLoadError, match="cannot load .*no-such/model.*HF_TOKEN"):
        build_models(ModelConfig(name_or_path="no-such/model"))


def test_meta_build_holds_no_storage_and_materializes_to_the_same_model(tiny_neox_dir):
    """Meta-built, materialised, then given the real weights: the same logits as the normally
    loaded model, which needs the rotary buffers (not in any state dict) rebuilt."""
    for cfg in (ModelConfig(**TINY, policy_dtype="float32", reference_dtype="bfloat16"),
                ModelConfig(name_or_path=str(tiny_neox_dir), policy_dtype="float32",
                            reference_dtype="float32")):
        policy, reference = build_models(cfg, seed=3)
        meta_policy, meta_reference = build_models(cfg, seed=3, on_meta=True)
        assert all(t.is_meta for t in [*meta_policy.parameters(), *meta_reference.buffers()])
        assert meta_reference.dtype == reference.dtype and not meta_reference.training
        ids = torch.randint(0, 500, (2, 11))
        for plain, meta in ((policy, meta_policy), (reference, meta_reference)):
            materialize(meta, "cpu")
            buffers = [name for name, _ in plain.named_buffers()]
            assert buffers and all(torch.equal(b, dict(meta.named_buffers())[n])
                                   for n, b in plain.named_buffers())
            meta.load_state_dict(plain.state_dict())
            torch.testing.assert_close(meta(input_ids=ids).logits, plain(input_ids=ids).logits,
                                       rtol=0, atol=0)


def test_meta_build_refuses_tied_embeddings(tmp_path):
    config = json.loads((resolve_model_json("tiny-mixtral.json")).read_text())
    (tmp_path / "tied.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ModelLoadError, match="model.meta_init=false"):
        build_models(ModelConfig(config_path=str(tmp_path / "tied.json")), on_meta=True)


def test_router_jitter_is_off_so_the_policy_starts_as_the_reference(tmp_path):
    """Mixtral's router_jitter_noise multiplies the router input by noise in train mode: the
    policy (training) would route differently from the reference (eval) at step 0."""
    from moedpo.config import MODEL_JSON_DIR

    fields = json.loads((MODEL_JSON_DIR / "tiny-mixtral.json").read_text())
    path = tmp_path / "jittery.json"
    path.write_text(json.dumps({**fields, "router_jitter_noise": 0.5}))
    policy, reference = build_models(ModelConfig(config_path=str(path), policy_dtype="float32",
                                                 reference_dtype="float32"))
    assert policy.config.router_jitter_noise == 0.0
    ids = torch.randint(3, 500, (2, 9))
    policy.train()
    torch.testing.assert_close(policy(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("settings, expected", [
    (dict(**TINY), "moedpo_sdpa"),  # auto: sdpa where the class has it (per pair on shared rows)
    (dict(config_path="tiny-gpt-oss.json"), "eager"),  # gpt-oss's sinks: no sdpa
    (dict(**TINY, flash_attention=False), "eager"),  # the seed's alias
    (dict(**TINY, attn_implementation="eager"), "eager"),
    (dict(**TINY, attn_implementation="flex_attention"), "flex_attention"),
    (dict(config_path="tiny-gpt-oss.json", attn_implementation="flex_attention"),
     "flex_attention"),
])
def test_attn_implementation_resolves_per_model_class(settings, expected):
    policy, reference = build_models(ModelConfig(**settings, policy_dtype="float32",
                                                 reference_dtype="float32"))
    assert policy.config._attn_implementation == expected
    assert reference.config._attn_implementation == expected


def test_attn_implementation_the_class_lacks_is_one_line_naming_what_it_has():
    with pytest.raises(ModelLoadError, match=r"attn_implementation=sdpa: GptOssForCausalLM "
                       r"does not support it; use auto or one of eager, flash_attention_2, "
                       r"flex_attention"):
        build_models(ModelConfig(config_path="tiny-gpt-oss.json", attn_implementation="sdpa"))


def test_gpt_oss_trains_from_the_embedded_config(tmp_path, caplog):
    """The whole run on gpt-oss (biased, transposed experts; sinks; sliding and full
    layers): auto attention is eager, the prompt is shared, step 0 is ln 2, and it learns."""
    from conftest import compose_cfg
    from moedpo.trainer import run

    cfg = compose_cfg("+experiment=demo", "model.config_path=tiny-gpt-oss.json", "max_steps=12",
                      "eval_frequency=12", "per_device_train_batch_size=8",
                      f"output_dir={tmp_path}", "exp_name=oss")
    with caplog.at_level("INFO", logger="moedpo"):
        run(cfg)
    assert "MoE experts implementation: dropless" in caplog.text
    assert "shared prompt off" not in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "oss" / "metrics.jsonl").open()]
    evals = [r for r in rows if "eval/loss" in r]
    assert evals[0]["eval/loss"] == pytest.approx(0.6931, abs=1e-4)
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] + 0.05
