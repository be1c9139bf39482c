"""model.activation_checkpointing: the checkpointed decoder layers run their forward again in
the backward, and loss and gradients equal the plain computation (router losses included)."""

import pytest
import torch

from conftest import random_pairs
from moedpo.config import ConfigError, validate
from moedpo.data import collate
from moedpo.evaluate import batch_loss
from moedpo.models.load import build_models
from moedpo.parallel.backend import Backend
from moedpo.train import place_models

CPU = Backend("cpu", torch.device("cpu"))


def loss_grads_and_layer_calls(cfg, seed: int = 0):
    policy, reference = build_models(cfg.model, seed)
    policy, reference = place_models(cfg, CPU, policy, reference)
    layers = [m for m in policy.modules() if type(m).__name__ in policy._no_split_modules]
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # the recompute runs the layer's forward, not its hooks
        norm = next(m for m in layer.children() if "norm" in type(m).__name__.lower())
        norm.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = collate(random_pairs(6, seed=3), pad_id=0)
    out = batch_loss(policy, reference, batch, cfg)
    out.loss.backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, calls


@pytest.mark.parametrize("model", ["mixtral", "neox"])
def test_checkpointed_layers_recompute_and_gradients_equal_plain(make_cfg, tiny_neox_dir, model):
    source = ("model.config_path=tiny-mixtral.json" if model == "mixtral"
              else f"model.name_or_path={tiny_neox_dir}")
    common = [source, "model.policy_dtype=float32", "model.reference_dtype=float32",
              "model.router_aux_loss_coef=0.1", "model.router_z_loss_coef=0.01"]
    plain_loss, plain_grads, plain_calls = loss_grads_and_layer_calls(make_cfg(*common))
    assert set(plain_calls) == {1}  # single process: off unless asked (null default)
    for every in (1, 2):
        cfg = make_cfg(*common, "model.activation_checkpointing=true",
                       f"model.activation_checkpointing_every={every}")
        loss, grads, calls = loss_grads_and_layer_calls(cfg)
        assert calls == [2 if i % every == 0 else 1 for i in range(len(calls))]
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
        assert grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_every_must_be_positive(make_cfg):
    with pytest.raises(ConfigError, match="model.activation_checkpointing_every=0"):
        validate(make_cfg("model.activation_checkpointing_every=0"))
