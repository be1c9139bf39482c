"""What transformers' loading defaults would change under moedpo (transformers 5.24 -> 5.25).

5.25 made `from_pretrained` turn Hugging Face Hub kernels on (`use_kernels` defaults to true,
its `kernels` package a dependency): every `train()`/`eval()` then kernelizes the model for its
device, swapping layer forwards under moedpo's experts, attention and precision code (and
raising on XLA). moedpo loads with them off unless `model.hub_kernels=true`. 5.25 also stopped
reading `_attn_implementation` / `_experts_implementation` from a folder's config.json;
moedpo chooses both itself either way.
"""

import importlib.util
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import compose_cfg
from moedpo.config import ConfigError, ModelConfig
from moedpo.models.load import ModelLoadError, build_models
from moedpo.validate import validate

HAVE_KERNELS = importlib.util.find_spec("kernels") is not None


def layer_forwards(model: torch.nn.Module) -> dict[str, tuple[str, str]]:
    """Each module's class and where the function its forward runs is defined: a Hub kernel
    replaces the latter per instance (kernels' `_replace_forward`) with a layer of its own."""
    def where(fn) -> str:
        fn = getattr(fn, "__func__", fn)
        return f"{fn.__module__}.{fn.__qualname__}"
    return {name: (type(m).__qualname__, where(m.forward)) for name, m in model.named_modules()}


def pretrained(folder, **extra) -> ModelConfig:
    return ModelConfig(name_or_path=str(folder), policy_dtype="float32",
                       reference_dtype="float32", **extra)


@pytest.mark.skipif(not HAVE_KERNELS, reason="the kernels package is not installed: "
                    "transformers cannot turn Hub kernels on here")
def test_transformers_default_would_turn_hub_kernels_on(tiny_mixtral_dir):
    """The premise of the tests below, checked on this install: plain from_pretrained says
    Hub kernels are on. If a release turns them back off by default this fails, and the
    tests below still hold moedpo to its own setting."""
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir)
    if not model.use_kernels:
        pytest.skip("this transformers does not turn Hub kernels on in from_pretrained")
    model.train()
    assert model.kernels_mode is not None


@pytest.mark.parametrize("folder", ["tiny_mixtral_dir", "tiny_neox_dir"])
def test_pretrained_models_load_with_hub_kernels_off_and_layers_as_built(folder, request):
    """A saved pretrained folder (the path users run) loads with Hub kernels off in both
    models, through train() and eval(), and every module runs the same forward as the same
    model built from its config (which no kernelize ever touched)."""
    folder = request.getfixturevalue(folder)
    policy, reference = build_models(pretrained(folder), seed=0)
    for model in (policy, reference):
        for mode in (True, False, True):
            model.train(mode)
            assert model.use_kernels is False
            assert not any("_kernel_repo" in m.__dict__ for m in model.modules())
    # Same module tree and forwards as moedpo's own build of that config (moedpo's experts
    # and attention in place of transformers' where it installs them).
    built, _ = build_models(ModelConfig(config_path=str(folder / "config.json"),
                                        policy_dtype="float32"), seed=0, with_reference=False)
    built.train()
    assert layer_forwards(policy) == layer_forwards(built)


@pytest.mark.skipif(not HAVE_KERNELS, reason="the kernels package is not installed")
def test_hub_kernels_true_turns_them_on(tiny_mixtral_dir):
    policy, reference = build_models(pretrained(tiny_mixtral_dir, hub_kernels=True), seed=0)
    assert policy.use_kernels and reference.use_kernels
    policy.train()
    assert policy.kernels_mode is not None


@pytest.mark.skipif(not HAVE_KERNELS, reason="the kernels package is not installed")
def test_hub_kernels_refused_by_the_environment_is_one_line(tiny_mixtral_dir, monkeypatch):
    monkeypatch.setenv("USE_HUB_KERNELS", "NO")
    with pytest.raises(ModelLoadError, match=r"model.hub_kernels=true: .*USE_HUB_KERNELS") as err:
        build_models(pretrained(tiny_mixtral_dir, hub_kernels=True), seed=0)
    assert "\n" not in str(err.value)


def test_hub_kernels_with_meta_init_is_refused_before_loading(tiny_mixtral_dir):
    cfg = compose_cfg("+experiment=demo", f"model.name_or_path={tiny_mixtral_dir}",
                      "model.config_path=null", "model.hub_kernels=true", "model.meta_init=true")
    with pytest.raises(ConfigError, match="model.hub_kernels=true: .*model.meta_init=false"):
        validate(cfg)


def test_hub_kernels_on_xla_is_refused_before_loading():
    cfg = compose_cfg("+experiment=demo", "parallel.backend=xla", "model.hub_kernels=true")
    with pytest.raises(ConfigError, match="model.hub_kernels=true: .* set model.hub_kernels="
                       "false on TPUs"):
        validate(cfg)


def test_config_json_implementation_keys_do_not_choose_for_moedpo(tiny_mixtral_dir, tmp_path):
    """Hub configs sometimes carry `_attn_implementation` / `_experts_implementation`
    (transformers 5.24 read the latter, 5.25 ignores both): moedpo's choice of attention and
    experts holds either way, and the forward is the one of a clean folder."""
    tainted = tmp_path / "tainted"
    shutil.copytree(tiny_mixtral_dir, tainted)
    config = json.loads((tainted / "config.json").read_text())
    config.update(_attn_implementation="eager", _experts_implementation="eager",
                  _attn_implementation_internal="eager", _experts_implementation_internal="eager")
    (tainted / "config.json").write_text(json.dumps(config))
    clean, _ = build_models(pretrained(tiny_mixtral_dir), seed=0, with_reference=False)
    loaded, _ = build_models(pretrained(tainted), seed=0, with_reference=False)
    for model in (clean, loaded):
        assert model.config._attn_implementation == "moedpo_sdpa"
        assert model.config._experts_implementation == "moedpo_dropless"
    ids = torch.randint(0, 500, (2, 12))
    torch.testing.assert_close(loaded(input_ids=ids).logits, clean(input_ids=ids).logits,
                               rtol=0, atol=0)
