"""Training-level MoE behaviour: routing metrics in the outputs, router losses in the
gradient, and the dropped path still learning the demo task."""

import json

import pytest
import torch

from conftest import random_pairs, tiny_train_overrides
from moedpo.data.collate import collate
from moedpo.evaluate import batch_loss
from moedpo.models.load import build_models
from moedpo.train import run


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


@pytest.mark.slow
def test_dropped_training_reaches_demo_level(make_cfg):
    """The demo with capacity_factor 1.25 (and Mixtral's own 0.02 load-balancing loss)."""
    result = run(make_cfg("+experiment=demo", "model.capacity_factor=1.25",
                          "model.router_aux_loss_coef=0.02"))
    assert result.final_eval["rewards/accuracies"] >= 0.9
    assert 0 < result.final_eval["moe/dropped_fraction"] < 0.2
