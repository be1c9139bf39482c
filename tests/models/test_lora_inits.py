"""Every LoRA init PEFT offers (model.lora.init) either starts the policy as the reference
(step-0 DPO loss ln 2) or is refused in one line before anything loads. PiSSA and OLoRA rewrite
the base as W - BA: their reference is a copy of the original base, not the adapters-off
residual."""

import math
import typing

import peft
import pytest
import torch

from conftest import tiny_train_overrides, train_rows
from moedpo.config import ConfigError, ModelConfig
from moedpo.models import lora
from moedpo.models.load import build_models
from moedpo.trainer import run
from moedpo.validate import validate


def peft_inits() -> list:
    """The values PEFT's LoraConfig declares for init_lora_weights (its public type hint), as
    a user writes them (pissa_niter_4)."""
    hint = typing.get_type_hints(peft.LoraConfig)["init_lora_weights"]
    values = []
    for arg in typing.get_args(hint):
        values.extend(typing.get_args(arg) or ([True, False] if arg is bool else []))
    return [v.replace("[number of iters]", "4") if isinstance(v, str) else v for v in values]


def test_moedpo_reads_the_inits_the_installed_peft_offers():
    assert lora.peft_inits() == {lora.init_family(v) for v in peft_inits()}
    assert {True, False, "gaussian", "pissa", "olora"} <= lora.peft_inits()


def test_every_init_peft_offers_is_placed():
    offered = peft_inits()
    assert {True, False, "gaussian", "pissa", "olora"} <= set(offered)
    for init in offered:
        family = lora.init_family(init)
        assert family in lora.INITS or family in lora.REFUSED_INITS, init


def overrides(init, experts: bool) -> list[str]:
    value = str(init).lower() if isinstance(init, bool) else init
    return [*tiny_train_overrides(), "max_steps=1", "model.lora.r=4",
            f"model.lora.init={value}", f"model.lora.target_experts={str(experts).lower()}"]


@pytest.mark.parametrize("experts", [False, True], ids=["attention", "experts"])
@pytest.mark.parametrize("init", peft_inits(), ids=str)
def test_init_starts_at_ln2_or_is_refused_in_one_line(make_cfg, init, experts):
    cfg = make_cfg(*overrides(init, experts))
    family = lora.init_family(init)
    refused = family in lora.REFUSED_INITS or (experts and family in lora.LINEAR_ONLY_INITS)
    if refused:
        with pytest.raises(ConfigError, match=f"model.lora.init={str(init).lower()}: ") as err:
            validate(cfg)
        assert "\n" not in str(err.value)
        return
    rows = train_rows(run(cfg).run_dir)
    first = [r for r in rows if "train/loss" in r][0]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5), init
    evals = [r for r in rows if "eval/loss" in r]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-5), init


def test_unknown_init_is_one_line(make_cfg):
    with pytest.raises(ConfigError, match="model.lora.init=banana: not an init PEFT offers; "
                       "use one of true, gaussian"):
        validate(make_cfg(*overrides("banana", False)))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_inits_keep_the_original_base_as_reference(make_cfg, init):
    cfg = ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                      reference_dtype="float32")
    cfg.lora.r, cfg.lora.init, cfg.lora.target_experts = 4, init, False
    base, _ = build_models(ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32"),
                           with_reference=False)
    policy, reference = build_models(cfg)
    assert not isinstance(reference, lora.AdaptersOff)
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base.eval()(input_ids=ids).logits
        torch.testing.assert_close(reference(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(policy.eval()(input_ids=ids).logits, want, rtol=1e-5,
                                   atol=1e-5)
        with policy.disable_adapter():  # what the reference would have been: the residual
            residual = policy(input_ids=ids).logits
    assert (residual - want).abs().max() > 0.05
    # Meta init (FSDP2's default) would leave no original base to copy: refused up front.
    with pytest.raises(ConfigError, match="rewrites the base weights.*meta_init=false"):
        validate(make_cfg(*overrides(init, False), "model.meta_init=true"))


def test_base_rewriting_init_with_a_checkpoint_base_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(*overrides("pissa", False), f"checkpoint_manager_path={tmp_path}")
    with pytest.raises(ConfigError, match="model.lora.init=pissa rewrites the base .*\\(moedpo "
                       "convert --to-hf"):
        validate(cfg)


def test_an_init_the_installed_peft_lacks_is_refused_with_how_to_upgrade(make_cfg, monkeypatch):
    monkeypatch.setattr(lora, "peft_inits", lambda: {True, False, "gaussian"})
    with pytest.raises(ConfigError, match=r"model.lora.init=nora: the installed peft .* does "
                                          r"not offer it yet; upgrade peft"):
        validate(make_cfg(*overrides("nora", True)))
