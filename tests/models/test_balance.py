"""Aux-loss-free balancing (model.router_bias_update_rate): the bias rule on a skewed
DeepSeek-V3 router, and a training run on a tiny DeepSeek-V3 whose biases are saved and
resumed."""

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from conftest import final_weights, tiny_train_overrides, train_rows, write_tiny_deepseek
from moedpo.models.balance import update_correction_biases
from moedpo.models.load import ModelLoadError


class Model(torch.nn.Module):
    """One router as a model: what update_correction_biases reads (router_modules)."""

    _can_record_outputs = {"router_logits": DeepseekV3TopkRouter}

    def __init__(self, router):
        super().__init__()
        self.gate = router


def counts_of(router, hidden) -> torch.Tensor:
    _, _, top = router(hidden)
    return torch.bincount(top.reshape(-1), minlength=router.num_experts).float()[None]


def test_bias_moves_by_the_sign_of_the_load_error_and_balances_a_skewed_router():
    config = DeepseekV3Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2,
                              n_group=1, topk_group=1)
    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
    hidden = torch.randn(512, 16) + 1.5  # a shared direction: a few experts take most tokens
    model = Model(router)
    counts = counts_of(router, hidden)
    cv = lambda c: float(c.std(unbiased=False) / c.mean())  # noqa: E731
    start = cv(counts)
    assert start > 0.5
    update_correction_biases(model, counts, 0.01)
    over, under = counts[0] > counts.mean(), counts[0] < counts.mean()
    assert torch.all(router.e_score_correction_bias[over] == -0.01)
    assert torch.all(router.e_score_correction_bias[under] == 0.01)
    for _ in range(300):
        update_correction_biases(model, counts_of(router, hidden), 0.01)
    assert cv(counts_of(router, hidden)) < start / 3


# Slow tier: a training run with resume; the bias update rule by hand stays in the fast tier.
@pytest.mark.slow
def test_training_moves_the_policys_biases_and_resumes_them(make_cfg, tmp_path):
    from moedpo.trainer import run

    path = write_tiny_deepseek(tmp_path / "tiny-deepseek.json")
    common = [*tiny_train_overrides(), f"model.config_path={path}", "dry_run=false",
              "eval_frequency=100", "report_metrics_freq=1",
              "model.router_bias_update_rate=0.01"]
    run(make_cfg(*common, "max_steps=4", "exp_name=straight"))
    run(make_cfg(*common, "max_steps=2", "exp_name=resumed"))
    run(make_cfg(*common, "max_steps=4", "exp_name=resumed"))
    train = lambda name: [r for r in train_rows(tmp_path / name) if "train/loss" in r]  # noqa: E731
    assert train("resumed") == train("straight")
    a = final_weights(tmp_path / "straight" / "checkpoints")
    b = final_weights(tmp_path / "resumed" / "checkpoints")
    biases = [k for k in a if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2 and all(torch.equal(a[k], b[k]) for k in biases)
    # 4 steps of +-0.01 each (0 where an expert sits exactly at its share): multiples of
    # the rate, at most 4 of them, not all zero.
    for key in biases:
        steps = a[key] / 0.01
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 4
        assert steps.abs().sum() > 0


def test_a_model_without_correction_bias_is_refused(make_cfg):
    from moedpo.trainer import run

    with pytest.raises(ModelLoadError, match="MixtralForCausalLM has no router with a "
                       "correction bias"):
        run(make_cfg(*tiny_train_overrides(), "model.router_bias_update_rate=0.001"))
