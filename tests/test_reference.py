"""reference.precompute: the cached reference log-probs give the same training as the live
reference model, and the cache is reused only when nothing it depends on has changed."""

import logging

import pytest
import torch

from conftest import assert_same_run, random_pairs, tiny_train_overrides
from moedpo import reference as reference_lib
from moedpo.config import ConfigError, validate
from moedpo.data import collate
from moedpo.train import run


@pytest.mark.parametrize("moe", [[], ["model.capacity_factor=1.0", "data.static_shapes=true"]],
                         ids=["dropless", "dropped"])
def test_precompute_equals_live_reference(make_cfg, tmp_path, moe):
    common = [*tiny_train_overrides(), "max_steps=4", "shuffle=true", *moe]
    run(make_cfg(*common, "exp_name=live"))
    run(make_cfg(*common, "exp_name=cached", "reference.precompute=true"))
    # Train and eval rows and final weights: the reference term is the same numbers, summed
    # over differently padded batches (rounding only).
    assert_same_run(tmp_path / "live", tmp_path / "cached", atol=1e-5)


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
    with pytest.raises(ConfigError, match="reference.precompute=true with loss.reference_free"):
        validate(make_cfg("reference.precompute=true", "loss.reference_free=true"))
