"""Training-level MoE behaviour: routing metrics in the outputs, router losses in the
gradient, and the dropped path still learning the demo task."""

import json

import pytest
import torch

from conftest import random_pairs, tiny_train_overrides
from moedpo.data.collate import collate
from moedpo.models.load import build_models
from moedpo.step import batch_loss
from moedpo.trainer import run


def test_routing_metrics_reach_metrics_jsonl_and_tensorboard(make_cfg):
    result = run(make_cfg(*tiny_train_overrides(), "model.capacity_factor=1.0"))
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in rows if "train/loss" in r)
    assert 0 < train["train/moe/dropped_fraction"] < 1
    assert 0 <= train["train/moe/fully_dropped_fraction"] <= train["train/moe/dropped_fraction"]
    for layer in range(4):
        assert train[f"train/moe/load_min/layer{layer}"] <= 1 <= train[
            f"train/moe/load_max/layer{layer}"]
    assert train["train/router/aux_loss"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert "train/moe/expert_load/layer0" in events.Tags()["histograms"]


@pytest.mark.parametrize("key", ["router_aux_loss_coef", "router_z_loss_coef"])
def test_router_loss_coefficients_reach_the_router_gradient(make_cfg, key):
    def router_grad(coef):
        cfg = make_cfg("model=tiny", f"model.{key}={coef}")
        policy, reference = build_models(cfg.model, seed=0)
        out = batch_loss(policy, reference, collate(random_pairs(4), pad_id=1), cfg)
        out.loss.backward()
        extra = getattr(out.router, key.removeprefix("router_").removesuffix("_coef"))
        return policy.model.layers[0].mlp.gate.weight.grad.clone(), out.loss.item(), extra.item()

    g0, loss0, _ = router_grad(0.0)
    g1, loss1, extra = router_grad(0.5)
    assert loss1 == pytest.approx(loss0 + 0.5 * extra, rel=1e-5)
    assert not torch.allclose(g0, g1)


# Slow tier: a 150-step demo; the router losses' gradients and the global-batch loss stay fast.
@pytest.mark.slow
def test_dropped_training_reaches_demo_level(make_cfg):
    """The demo with capacity_factor 1.25 (and Mixtral's own 0.02 load-balancing loss)."""
    result = run(make_cfg("+experiment=demo", "model.capacity_factor=1.25",
                          "model.router_aux_loss_coef=0.02"))
    assert result.final_eval["rewards/accuracies"] >= 0.9
    assert 0 < result.final_eval["moe/dropped_fraction"] < 0.2


def test_global_batch_router_loss_equal_for_accumulation_1x8_and_2x4(make_cfg, tmp_path):
    """router_aux_loss_scope=global_batch takes the expert shares over the whole step: 2
    accumulated micro-batches of 4 train as 1 of 8 (the pre-pass counts both first); each
    micro-batch's own shares (micro_batch) train another model."""
    from conftest import assert_same_run

    base = [*tiny_train_overrides(), "model.router_aux_loss_coef=0.5", "shuffle=true"]
    scope = "model.router_aux_loss_scope="

    def train(name, batch, accumulation, kind):
        run(make_cfg(*base, f"per_device_train_batch_size={batch}",
                     f"gradient_accumulation_steps={accumulation}", f"{scope}{kind}",
                     f"exp_name={name}"))
        return tmp_path / name

    one = train("one", 8, 1, "global_batch")
    assert_same_run(one, train("two", 4, 2, "global_batch"), atol=1e-5, rel=1e-5)
    with pytest.raises(AssertionError):
        assert_same_run(one, train("local", 4, 2, "micro_batch"), atol=1e-5, rel=1e-5)
