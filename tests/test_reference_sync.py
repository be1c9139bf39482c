"""TR-DPO (reference.sync_every / sync_alpha): the update rule, its effect on a run, and
exact resume with the reference's weights in the checkpoints."""

import math

import pytest
import torch

from conftest import final_weights, tiny_train_overrides, train_rows
from moedpo.config import ConfigError, ModelConfig
from moedpo.models.load import build_models
from moedpo.reference_sync import sync_reference
from moedpo.trainer import run
from moedpo.validate import validate


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_soft_and_hard_updates_of_a_bfloat16_reference(alpha):
    policy, reference = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                                 policy_dtype="float32",
                                                 reference_dtype="bfloat16"), seed=1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    before = {k: v.detach().double() for k, v in reference.named_parameters()}
    sync_reference(reference, policy, alpha)
    for name, p in reference.named_parameters():
        target = dict(policy.named_parameters())[name].detach().double()
        expected = ((1 - alpha) * before[name] + alpha * target).to(torch.bfloat16)
        assert p.dtype == torch.bfloat16
        # One bfloat16 rounding of the float32 mix (bit-exact for a copy).
        tolerance = 0 if alpha == 1 else 8e-3
        torch.testing.assert_close(p.detach().double(), expected.double(), rtol=tolerance,
                                   atol=0 if alpha == 1 else 1e-6)


def eval_row(run_dir, step: int) -> dict:
    return next(r for r in train_rows(run_dir) if r["step"] == step and "eval/loss" in r)


def test_a_hard_sync_makes_the_reference_the_policy(make_cfg):
    """sync_every=2, alpha 1: after step 2 the reference is the policy, so the eval at step
    2 sees equal log-ratios: loss ln 2, margins 0. Without sync it does not."""
    common = [*tiny_train_overrides(), "eval_frequency=2", "max_steps=3"]
    synced = run(make_cfg(*common, "reference.sync_every=2", "reference.sync_alpha=1.0",
                          "exp_name=synced"))
    plain = run(make_cfg(*common, "exp_name=plain"))
    row = eval_row(synced.run_dir, 2)
    assert row["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(row["eval/rewards/margins"]) < 1e-6
    assert abs(eval_row(plain.run_dir, 2)["eval/loss"] - math.log(2)) > 1e-3


def test_resume_restores_the_synced_reference(make_cfg, tmp_path):
    common = [*tiny_train_overrides(), "reference.sync_every=1", "reference.sync_alpha=0.5",
              "eval_frequency=100", "dry_run=false", "report_metrics_freq=1"]
    run(make_cfg(*common, "max_steps=4", "exp_name=straight"))
    run(make_cfg(*common, "max_steps=2", "exp_name=resumed"))
    run(make_cfg(*common, "max_steps=4", "exp_name=resumed"))
    train = lambda name: [r for r in train_rows(tmp_path / name) if "train/loss" in r]  # noqa: E731
    assert train("resumed") == train("straight")
    a = final_weights(tmp_path / "straight" / "checkpoints", ("model.", "reference."))
    b = final_weights(tmp_path / "resumed" / "checkpoints", ("model.", "reference."))
    ref = [k for k in a if k.startswith("reference.")]
    assert ref and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    ("reference.precompute=true", "with reference.precompute=true"),
    ("loss.name=simpo", "these losses read no reference to update"),
    ("reference.sync_alpha=0", "reference.sync_alpha=0.0: must be in (0, 1]")])
def test_refused_combinations(make_cfg, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        validate(make_cfg("reference.sync_every=4", *extra.split()))
