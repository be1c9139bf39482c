import pytest
import torch

from moedpo.config import ModelConfig
from moedpo.models.load import ModelLoadError, build_models, load_tokenizer

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


def test_tokenizer_sources(tiny_neox_dir):
    embedded = load_tokenizer(ModelConfig(**TINY))
    assert embedded.pad_token == "<|pad|>" and embedded.eos_token == "<|endoftext|>"
    from_model = load_tokenizer(ModelConfig(name_or_path=str(tiny_neox_dir)))
    assert len(from_model) == len(embedded)


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot load .*no-such/model.*HF_TOKEN"):
        build_models(ModelConfig(name_or_path="no-such/model"))
