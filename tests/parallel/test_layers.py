"""What parallel/layers.py applies to the decoder layers. model.activation_checkpointing: the
checkpointed layers run their forward again in the backward; model.compile: layers run as
compiled graphs. Loss and gradients equal the plain computation (router losses included)."""

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import random_pairs
from moedpo.config import ConfigError
from moedpo.data import collate
from moedpo.models.load import build_models
from moedpo.parallel import make_strategy
from moedpo.parallel.backend import Backend
from moedpo.placement import place_models
from moedpo.step import batch_loss
from moedpo.validate import validate

CPU = Backend("cpu", torch.device("cpu"))


def loss_grads_and_layer_calls(cfg, seed: int = 0, batches: int = 1):
    policy, reference = build_models(cfg.model, seed)
    policy, reference = place_models(make_strategy(cfg, CPU), policy, reference)
    layers = [m for m in policy.modules() if type(m).__name__ in policy._no_split_modules]
    calls = [0] * len(layers)
    for i, layer in enumerate([] if cfg.model.compile else layers):
        # the recompute runs the layer's forward, not its hooks: count a child's calls
        norm = next(m for m in layer.children() if "norm" in type(m).__name__.lower())
        norm.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    graphs = []  # graphs compiled so far, after each batch
    for n in range(batches):  # batches of different lengths
        policy.zero_grad()
        out = batch_loss(policy, reference, collate(random_pairs(6 - n, seed=3 + n), pad_id=0),
                         cfg)
        out.loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, calls, graphs


@pytest.mark.parametrize("model", ["mixtral", "neox"])
def test_checkpointed_layers_recompute_and_gradients_equal_plain(make_cfg, tiny_neox_dir, model):
    source = ("model.config_path=tiny-mixtral.json" if model == "mixtral"
              else f"model.name_or_path={tiny_neox_dir}")
    common = [source, "model.policy_dtype=float32", "model.reference_dtype=float32",
              "model.router_aux_loss_coef=0.1", "model.router_z_loss_coef=0.01"]
    plain_loss, plain_grads, plain_calls, _ = loss_grads_and_layer_calls(make_cfg(*common))
    assert set(plain_calls) == {1}  # single process: off unless asked (null default)
    for every in (1, 2):
        cfg = make_cfg(*common, "model.activation_checkpointing=true",
                       f"model.activation_checkpointing_every={every}")
        loss, grads, calls, _ = loss_grads_and_layer_calls(cfg)
        assert calls == [2 if i % every == 0 else 1 for i in range(len(calls))]
        torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
        assert grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_every_must_be_positive(make_cfg):
    with pytest.raises(ConfigError, match="model.activation_checkpointing_every=0"):
        validate(make_cfg("model.activation_checkpointing_every=0"))


def test_compiled_layers_equal_eager(make_cfg):
    common = ["model.config_path=tiny-mixtral.json", "model.policy_dtype=float32",
              "model.reference_dtype=float32", "model.router_aux_loss_coef=0.1"]
    eager_loss, eager_grads, _, _ = loss_grads_and_layer_calls(make_cfg(*common), batches=3)
    torch._dynamo.reset()
    counters.clear()
    loss, grads, _, graphs = loss_grads_and_layer_calls(
        make_cfg(*common, "model.compile=true"), batches=3)
    # The layers ran compiled; the second length made the graphs dynamic, the third
    # length compiles nothing new (no recompilation per batch).
    assert 0 < graphs[0] < graphs[1] == graphs[2]
    # Hooks added per forward (router logits) once made dynamo recompile until its limit.
    assert not [k for k in counters["unimplemented"] if "recompile limit" in k]
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_refused_on_xla(make_cfg, monkeypatch):
    """Refused by validate wherever the run goes to XLA (`auto` included), before loading."""
    import moedpo.validate as validate_module

    validate_module.check_placement(make_cfg("model.compile=true"))  # fine on the CPU
    monkeypatch.setattr(validate_module, "choose_kind", lambda requested: "xla")
    with pytest.raises(ConfigError, match="model.compile=true: on XLA every step is compiled"):
        validate_module.validate(make_cfg("model.compile=true"))
