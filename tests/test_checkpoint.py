import pytest
import torch

from moedpo.checkpoint import CheckpointError, restore_weights, save_weights
from moedpo.config import ModelConfig
from moedpo.models.load import build_models

TINY = ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                   reference_dtype="bfloat16")


def test_restores_newest_step_into_both_models(tmp_path):
    source, _ = build_models(TINY, seed=7)
    older, _ = build_models(TINY, seed=8)
    save_weights(older, str(tmp_path / "100"))
    save_weights(source, str(tmp_path / "200"))
    policy, reference = build_models(TINY, seed=0)
    used = restore_weights(str(tmp_path), [policy, reference])
    assert used.endswith("/200")
    for name, param in source.named_parameters():
        assert torch.equal(dict(policy.named_parameters())[name], param)
        ref = dict(reference.named_parameters())[name]
        assert ref.dtype == torch.bfloat16 and torch.equal(ref, param.to(torch.bfloat16))


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="holds no DCP checkpoint"):
        restore_weights(str(tmp_path), [])
