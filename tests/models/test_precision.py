"""Mixed precision: a bf16 policy trains float32 master weights on a bf16 compute copy, and
learns at DPO learning rates as a float32 policy does; pure bf16 (the old behaviour, now
`model.mixed_precision=false`) rounds those updates away."""

import json
import math

import pytest
import torch

from conftest import tiny_train_overrides
from moedpo.config import ModelConfig
from moedpo.models.load import build_models
from moedpo.models.precision import cast_parameters, compute_copies
from moedpo.parallel.layers import checkpoint_decoder_layers
from moedpo.step import batch_loss
from moedpo.trainer import run

BF16 = ["model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16"]
FP32 = ["model.policy_dtype=float32", "model.reference_dtype=float32"]


def loss_drop(make_cfg, name: str, *overrides: str) -> float:
    """ln 2 minus the eval loss after 8 AdamW steps at lr 5e-6, no warm-up, 8 pairs a step."""
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=8", "per_device_train_batch_size=8",
                   "lr=5e-6", "sched.warmup_steps=0", "eval_frequency=100", "loggers=[]",
                   f"exp_name={name}", *overrides)
    result = run(cfg)
    first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    # Step 0: the policy's compute copy is the reference, to the bit.
    assert first["eval/rewards/chosen"] == first["eval/rewards/rejected"] == 0.0
    return math.log(2) - result.final_eval["loss"]


# Slow tier: three 8-step runs (fp32, mixed, pure bf16); the masters, their gradients and
# their save stay in the fast tier.
@pytest.mark.slow
def test_bf16_policy_learns_at_dpo_learning_rates(make_cfg):
    fp32 = loss_drop(make_cfg, "fp32", *FP32)
    mixed = loss_drop(make_cfg, "mixed", *BF16)
    pure = loss_drop(make_cfg, "pure", *BF16, "model.mixed_precision=false")
    assert fp32 > 0.005  # the run learns at all
    assert 0.8 < mixed / fp32 < 1.25
    assert pure / fp32 < 0.3  # bf16 parameters and AdamW state: most updates round away


def test_mixed_policy_keeps_float32_masters_and_saves_them(make_cfg):
    result = run(make_cfg(*tiny_train_overrides(), "max_steps=1", *BF16))
    assert {p.dtype for p in result.policy.parameters()} == {torch.float32}


def tiny(dtype: str, mixed: bool = True):
    cfg = ModelConfig(config_path="tiny-mixtral.json", policy_dtype=dtype,
                      reference_dtype="bfloat16", mixed_precision=mixed)
    return build_models(cfg, seed=3)


def test_reference_is_the_rounding_of_the_masters_with_float32_buffers():
    policy, reference = tiny("bfloat16")
    for (name, p), r in zip(policy.named_parameters(), reference.parameters(), strict=True):
        assert p.dtype == torch.float32 and r.dtype == torch.bfloat16, name
        assert torch.equal(p.to(torch.bfloat16), r), name
    buffers = dict(reference.named_buffers())
    assert any("inv_freq" in k for k in buffers)
    assert all(b.dtype == torch.float32 for k, b in buffers.items() if "inv_freq" in k)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_master_gradients_equal_the_bf16_models(make_cfg, tokenizer, checkpointed):
    """Gradients arrive in the float32 masters exactly as a bf16 model computes them (the
    copy's backward only widens them), and activation checkpointing's recompute sees the
    same bf16 weights."""
    from moedpo.data import build_data
    from moedpo.layout import batch_maker
    from moedpo.parallel import make_strategy
    from moedpo.parallel.backend import Backend

    cfg = make_cfg(*tiny_train_overrides(), *BF16)
    policy, reference = tiny("bfloat16")
    pure = cast_parameters(build_models(ModelConfig(
        config_path="tiny-mixtral.json", policy_dtype="float32"), seed=3)[0], torch.bfloat16)
    if checkpointed:
        for model in (policy, pure):
            checkpoint_decoder_layers(model)
    data = build_data(cfg, tokenizer, 512)
    batch = batch_maker(cfg, tokenizer, make_strategy(cfg, Backend("cpu", torch.device("cpu"))))(
        data.train[:4])
    masters = {name: p for name, p in policy.named_parameters()}
    with compute_copies(policy, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in policy.parameters())
        batch_loss(policy, reference, batch, cfg).loss.backward()
    assert dict(policy.named_parameters()) == masters  # the masters are back in place
    batch_loss(pure, reference, batch, cfg).loss.backward()
    for (name, master), p in zip(policy.named_parameters(), pure.parameters(), strict=True):
        assert master.grad.dtype == torch.float32
        assert torch.equal(master.grad, p.grad.float()), name
