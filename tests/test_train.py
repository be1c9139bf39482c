import json
import math

import pytest
import torch

from conftest import assert_same_run, tiny_train_overrides
from moedpo.trainer import run

TRAIN_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
              "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
              "logits/rejected", "num_examples", "grad_norm", "lr", "examples_per_second",
              "tokens_per_second", "memory/measured_peak"}


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_metrics_config_and_tensorboard(make_cfg):
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=5", "report_metrics_freq=2")
    result = run(cfg)
    rows = read_rows(result.run_dir)
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    trains = [r for r in rows if any(k.startswith("train/") for k in r)]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]  # first, every 2, final
    assert [r["step"] for r in trains] == [0, 2, 4]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval/rewards/accuracies"] == 0 and evals[0]["examples"] == 0
    assert evals[0]["eval/num_examples"] == 80  # dry_run: 10 eval batches of 8
    assert {k.split("/", 1)[1] for k in trains[0] if "/" in k} >= TRAIN_KEYS
    assert trains[-1]["examples"] == 5 * 4
    peaks = [r["train/memory/measured_peak"] for r in trains]  # the process's resident peak
    assert peaks == sorted(peaks) and peaks[0] > 100e6  # torch alone takes more than that
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert (result.run_dir / "config.yaml").read_text().count("exp_name: demo") == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert "train/rewards/margins" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4, 5]


def test_gradient_accumulation_equals_one_big_batch(make_cfg):
    common = [*tiny_train_overrides(), "max_steps=2", "shuffle=false", "do_first_eval=false",
              "eval_frequency=100", "optimizer=SGD", "lr=0.5", "sched.warmup_steps=0"]
    big = run(make_cfg(*common, "per_device_train_batch_size=4", "exp_name=big"))
    accum = run(make_cfg(*common, "per_device_train_batch_size=2",
                         "gradient_accumulation_steps=2", "exp_name=accum"))
    for (name, a), (_, b) in zip(big.policy.named_parameters(), accum.policy.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=name)
    initial = run(make_cfg(*common, "max_steps=0", "exp_name=init")).policy
    assert not torch.allclose(initial.lm_head.weight, big.policy.lm_head.weight)
    assert big.final_eval["loss"] == pytest.approx(accum.final_eval["loss"], abs=1e-6)


def test_n_epochs_ends_the_run(make_cfg):
    # dry_run keeps 10 global batches; 2 epochs of them end the run before max_steps.
    result = run(make_cfg(*tiny_train_overrides(), "max_steps=null", "n_epochs=2",
                          "do_first_eval=false", "eval_frequency=100"))
    rows = read_rows(result.run_dir)
    assert rows[-1]["step"] == 20 and "eval/loss" in rows[-1]


def test_synthetic_data_trains_without_a_dataset(make_cfg):
    result = run(make_cfg("model=tiny", "use_synthetic_data=true", "max_length=32",
                          "per_device_train_batch_size=2", "max_steps=2"))
    assert math.isfinite(result.final_eval["loss"])
    assert result.final_eval["num_examples"] == 4


def test_rerun_of_a_finished_run_resumes_at_its_end(make_cfg):
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=2")
    run(cfg)
    first = read_rows(cfg.run_dir)
    run(cfg)  # resume=auto: nothing left to train, the final eval is redone in place
    assert read_rows(cfg.run_dir) == first


def test_length_buckets_train_like_max_length_padding(make_cfg, tmp_path):
    """Static shapes padded to the shortest fitting bucket instead of max_length: with the
    dropless MoE padding changes nothing, so both runs are the same run."""
    common = [*tiny_train_overrides(), "max_steps=4", "shuffle=true", "data.static_shapes=true",
              "max_length=64", "max_prompt_length=32", "per_device_train_batch_size=2"]
    run(make_cfg(*common, "exp_name=full"))
    run(make_cfg(*common, "exp_name=buckets", "data.length_buckets=[24,40]"))
    # Metrics agree within 1e-5; 1e-4 for the weights: other padded lengths sum in another
    # order, and AdamW turns the rounding of a near-zero gradient (an embedding row of a rare
    # token) into a visible difference of its update (2.7e-5 seen).
    assert_same_run(tmp_path / "full", tmp_path / "buckets", atol=1e-4)


def test_length_buckets_must_fit_max_length(make_cfg):
    from moedpo.config import ConfigError
    from moedpo.validate import validate

    with pytest.raises(ConfigError, match=r"data.length_buckets=\[128, 600\]"):
        validate(make_cfg("max_length=512", "data.length_buckets=[128,600]"))
