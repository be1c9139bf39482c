"""reference.precompute: the cached reference log-probs give the same training as the live
reference model, and the cache is reused only when nothing it depends on has changed."""

import json
import logging

import pytest
import torch

from conftest import assert_same_run, random_pairs, tiny_train_overrides
from moedpo import reference as reference_lib
from moedpo.config import ConfigError
from moedpo.data import collate
from moedpo.trainer import run
from moedpo.validate import validate


@pytest.mark.parametrize("moe", [[], ["model.capacity_factor=1.0", "data.static_shapes=true"]],
                         ids=["dropless", "dropped"])
def test_precompute_equals_live_reference(make_cfg, tmp_path, moe):
    common = [*tiny_train_overrides(), "max_steps=4", "shuffle=true", *moe]
    run(make_cfg(*common, "exp_name=live"))
    run(make_cfg(*common, "exp_name=cached", "reference.precompute=true"))
    # Train and eval rows and final weights: the reference term is the same numbers, summed
    # over differently padded batches (rounding only). Routing drift needs the reference's
    # routers, which a precomputed reference does not run: only the live run has it.
    assert_same_run(tmp_path / "live", tmp_path / "cached", atol=1e-5,
                    ignore=("routing_agreement", "router_kl"))
    rows = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").open()]
    assert not any("routing_agreement" in k for row in rows for k in row)


def cache_files(folder):
    return sorted(folder.glob("reference_logps-*.safetensors"))


def test_cache_is_reused_and_keyed_by_what_it_depends_on(make_cfg, tmp_path, monkeypatch,
                                                         caplog):
    common = [*tiny_train_overrides(), "max_steps=1", "reference.precompute=true",
              f"reference.cache_dir={tmp_path / 'cache'}", "resume=false", "overwrite=true"]
    run(make_cfg(*common))
    assert len(cache_files(tmp_path / "cache")) == 1

    def no_compute(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(reference_lib, "compute", no_compute)
        with caplog.at_level(logging.INFO, logger="moedpo"):
            run(make_cfg(*common))
    assert "reference log-probs from cache" in caplog.text

    # Anything the values depend on makes a new entry: truncation (when it changes tokens),
    # init seed, MoE capacity.
    for change in [["max_length=48", "max_prompt_length=24"], ["seed=1"],
                   ["model.capacity_factor=2.0"]]:
        run(make_cfg(*common, *change))
    assert len(cache_files(tmp_path / "cache")) == 4


def test_cache_with_wrong_contents_is_recomputed(make_cfg, tmp_path):
    common = [*tiny_train_overrides(), "max_steps=1", "reference.precompute=true",
              f"reference.cache_dir={tmp_path}", "resume=false", "overwrite=true"]
    run(make_cfg(*common))
    (path,) = cache_files(tmp_path)
    good = path.read_bytes()
    path.write_bytes(b"not a safetensors file")
    run(make_cfg(*common))  # ignored with a warning, computed again, rewritten
    assert path.read_bytes() == good


def test_collate_carries_reference_in_row_order():
    pairs = [reference_lib.attach([p], torch.tensor([[-1.0 - i, -10.0 - i]]))[0]
             for i, p in enumerate(random_pairs(3))]
    batch = collate(pairs, pad_id=0)
    assert batch["reference_logps"].tolist() == [-1.0, -2.0, -3.0, -10.0, -11.0, -12.0]
    assert "reference_logps" not in collate(random_pairs(3), pad_id=0)


def test_precompute_conflicts_with_reference_free(make_cfg):
    with pytest.raises(ConfigError,
                       match="reference.precompute=true with loss.name=.* and loss.reference_free"):
        validate(make_cfg("reference.precompute=true", "loss.reference_free=true"))


def built_reference(cfg) -> torch.nn.Module:
    from moedpo.models.load import build_models

    return build_models(cfg.model, cfg.seed)[1]


def key_of(cfg, pad_to=None, devices=1, reference=None):
    from moedpo.data import DataBundle

    data = DataBundle(train=random_pairs(3), eval=random_pairs(2, seed=1))
    reference = built_reference(cfg) if reference is None else reference
    return reference_lib.cache_path(cfg, reference_lib.cache_fields(cfg, data, pad_to,
                                                                     reference, devices))


@pytest.mark.parametrize("setting", [
    "model.lora.r=4",  # the LoRA reference: the base in policy_dtype, adapters off
    "model.reference_dtype=bfloat16",
    "model.attn_implementation=eager",
    "model.capacity_factor=1.5",
    "model.moe_implementation=dense",
    "model.hub_kernels=true",
])
def test_cache_key_follows_the_reference_actually_built(make_cfg, setting):
    """Each setting that changes the reference changes the key, read from the built module
    (a full fine-tuning run reused a LoRA run's file before: 0.158 nats off)."""
    base = [*tiny_train_overrides(), "model.policy_dtype=float32",
            "model.reference_dtype=float32"]
    assert key_of(make_cfg(*base)) == key_of(make_cfg(*base))  # same settings: a hit
    assert key_of(make_cfg(*base, setting)) != key_of(make_cfg(*base)), setting


def test_lora_cache_key_follows_policy_dtype_init_and_quantization(make_cfg, tiny_mixtral_dir):
    """Under LoRA the reference is the base in policy_dtype (reference_dtype unused), PiSSA's
    a copy of the original base, QLoRA's the NF4 base: each a different key."""
    import importlib.util

    lora = [*tiny_train_overrides(), "model.lora.r=4", "model.reference_dtype=float32"]
    keys = {key_of(make_cfg(*lora, "model.policy_dtype=float32")),
            key_of(make_cfg(*lora, "model.policy_dtype=bfloat16")),
            key_of(make_cfg(*lora, "model.policy_dtype=float32", "model.lora.init=pissa",
                            "model.lora.target_experts=false")),
            key_of(make_cfg(*lora, "model.policy_dtype=float32",
                            "model.lora.target_experts=false"))}
    assert len(keys) == 4
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: the QLoRA key is not checked")
    pretrained = [*lora, "model.config_path=null", f"model.name_or_path={tiny_mixtral_dir}",
                  "model.policy_dtype=float32"]
    assert key_of(make_cfg(*pretrained, "model.lora.quantize=4bit")) != \
        key_of(make_cfg(*pretrained))


def test_cache_key_follows_the_model_json_contents_not_its_path(make_cfg, tmp_path):
    from moedpo.config import MODEL_JSON_DIR

    config = tmp_path / "model.json"
    config.write_text((MODEL_JSON_DIR / "tiny-mixtral.json").read_text())
    cfg = make_cfg("model=tiny", f"model.config_path={config}")
    before = key_of(cfg)
    fields = json.loads(config.read_text())
    config.write_text(json.dumps({**fields, "rope_theta": 1234.0}))  # edited in place
    assert key_of(cfg) != before


def test_cache_key_follows_a_local_folders_config_tokenizer_and_weights(make_cfg, tmp_path,
                                                                        tiny_neox_dir):
    import os
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_neox_dir, folder)
    cfg = make_cfg("model=pythia", f"model.name_or_path={folder}")
    keys = [key_of(cfg)]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rotary_pct": 0.5}))
    keys.append(key_of(cfg))
    (folder / "tokenizer_config.json").write_text(
        (folder / "tokenizer_config.json").read_text().replace("2048", "1024"))
    keys.append(key_of(cfg))
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    keys.append(key_of(cfg))
    assert len(set(keys)) == 4
    assert key_of(cfg) == keys[-1]  # and nothing else moves it


def test_cache_key_names_the_hub_commit(make_cfg, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--org--tiny"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text('{"n": 1}')
    (repo / "refs").mkdir()
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = make_cfg("model=pythia", "model.name_or_path=org/tiny")
    (repo / "refs" / "main").write_text("a" * 40)
    assert reference_lib._model_fields(cfg)["commit"] == "a" * 40
    reference = built_reference(make_cfg(*tiny_train_overrides()))  # a stand-in: not loadable
    before = key_of(cfg, reference=reference)
    (repo / "refs" / "main").write_text("b" * 40)  # main moved on: another model
    assert key_of(cfg, reference=reference) != before


def test_cache_key_holds_the_batch_geometry_only_where_it_changes_values(make_cfg):
    dropped = make_cfg(*tiny_train_overrides(), "model.capacity_factor=1.0")
    dropless = make_cfg(*tiny_train_overrides())
    for cfg, changes in ((dropped, True), (dropless, False)):
        base = key_of(cfg)
        other_batch = key_of(make_cfg(*tiny_train_overrides(), "per_device_eval_batch_size=3",
                                      *(["model.capacity_factor=1.0"] if changes else [])))
        assert (other_batch != base) == changes
        assert (key_of(cfg, devices=2) != base) == changes
    assert key_of(dropped, pad_to=64) == key_of(dropped, pad_to=64, devices=2)  # static shapes
