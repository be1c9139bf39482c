"""data.share_prompt: the prompt runs once per pair, and log-probs, gradients and whole
training runs equal the unshared computation."""

import pytest
import torch

from conftest import assert_same_run, random_pairs, tiny_train_overrides
from moedpo.config import ConfigError, ModelConfig
from moedpo.data import collate, collate_shared
from moedpo.layout import attention_blocks, shared_prompt_mask
from moedpo.models.load import build_models
from moedpo.step import batch_logps
from moedpo.trainer import run
from moedpo.validate import validate


@pytest.mark.parametrize("packed", [False, True], ids=["shared", "packed"])
@pytest.mark.parametrize("chunk", [0, 16], ids=["full-logits", "chunked"])
@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("model", ["mixtral", "neox"])
def test_shared_logps_and_gradients_equal_unshared(tiny_neox_dir, model, sdpa, chunk, packed):
    """One pair per row, or packed several to a row (data.packing), against the plain
    layout: the same log-probs, token counts and gradients."""
    source = (dict(config_path="tiny-mixtral.json") if model == "mixtral"
              else dict(name_or_path=str(tiny_neox_dir)))
    cfg = ModelConfig(**source, policy_dtype="float32", reference_dtype="float32",
                      flash_attention=sdpa, logps_chunk_size=chunk)
    policy, _ = build_models(cfg, seed=0)
    pairs = random_pairs(8, seed=1)
    other = collate_shared(pairs, pad_id=0, max_tokens=48 if packed else 0)
    assert (other["input_ids"].shape[0] < 8) == packed  # several pairs to a row when packed
    # sdpa runs models.block_attention (per pair), eager the dense 4-D mask: both checked
    assert (attention_blocks(policy, other) is not None) == sdpa
    results = []
    for batch in (collate(pairs, pad_id=0), other):
        policy.zero_grad()
        logps, _ = batch_logps(policy, batch, -100)
        (logps.logps * torch.linspace(-1, 1, 16)).sum().backward()  # weigh every row apart
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((logps, grads))
    (plain, plain_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared.logps, plain.logps, rtol=0, atol=1e-5)
    assert torch.equal(shared.n_tokens, plain.n_tokens)
    torch.testing.assert_close(shared.mean_logits, plain.mean_logits, rtol=0, atol=1e-6)
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_mask_keeps_responses_apart():
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, 3]])
    allowed = shared_prompt_mask(segments, torch.float32)[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 1, 0, 0],
                             [1, 1, 0, 0, 1, 1, 0],
                             [1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_training_with_shared_prompt_equals_plain(make_cfg, tmp_path, caplog):
    # Router losses on: the shared prompt's tokens count twice in them (and in the expert
    # loads), as the unshared rows hold them twice.
    common = [*tiny_train_overrides(), "max_steps=4", "shuffle=true",
              "model.router_aux_loss_coef=0.05", "model.router_z_loss_coef=0.01"]
    run(make_cfg(*common, "exp_name=plain", "data.share_prompt=false"))
    with caplog.at_level("INFO", logger="moedpo"):
        run(make_cfg(*common, "exp_name=shared"))  # the default: auto, on here
    assert "shared prompt off" not in caplog.text
    # Metrics within 1e-4 of their size: the two layouts sum in other orders, and once the
    # weights differ by that rounding a near-tie in some router's top-k can flip on one
    # machine's kernels and not another's (seen: one of 6293 eval tokens at step 4 on an
    # AVX-512 CPU, moving the eval rewards by 5e-5 of their size). A wrong mask or position
    # is off by far more, from step 0.
    assert_same_run(tmp_path / "plain", tmp_path / "shared", atol=1e-5, rel=1e-4)


@pytest.mark.parametrize("scope", ["micro_batch", "sequence"])
def test_router_losses_and_loads_of_shared_rows_equal_unshared(scope):
    """Also the sequence-wise loss: a shared row's prompt is part of both its sequences."""
    from moedpo.step import batch_loss

    cfg = ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                      reference_dtype="float32")
    policy, _ = build_models(cfg, seed=0)
    from conftest import compose_cfg
    run_cfg = compose_cfg("model.router_aux_loss_coef=0.1", "model.router_z_loss_coef=0.1",
                          "loss.reference_free=true", f"model.router_aux_loss_scope={scope}")
    pairs = random_pairs(6, seed=3)
    plain, shared = (batch_loss(policy, None, to_batch(pairs, pad_id=0), run_cfg)
                     for to_batch in (collate, collate_shared))
    for key in ("aux_loss", "z_loss", "real_tokens"):
        torch.testing.assert_close(getattr(shared.router, key), getattr(plain.router, key),
                                   rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(shared.router.expert_counts, plain.router.expert_counts)
    torch.testing.assert_close(shared.loss, plain.loss, rtol=1e-5, atol=1e-6)
    if scope == "sequence":  # packed rows too; and it is another loss than the batch's
        packed = batch_loss(policy, None, collate_shared(pairs, pad_id=0, max_tokens=48),
                            run_cfg)
        torch.testing.assert_close(packed.router.aux_loss, plain.router.aux_loss,
                                   rtol=1e-5, atol=1e-6)
        batch_cfg = compose_cfg("loss.reference_free=true")
        whole = batch_loss(policy, None, collate(pairs, pad_id=0), batch_cfg)
        assert abs(whole.router.aux_loss - plain.router.aux_loss) > 1e-3


@pytest.mark.parametrize("extra", [["model.capacity_factor=1.25"], ["data.static_shapes=true"]])
def test_explicit_shared_prompt_refuses_dropped_moe_and_static_shapes(make_cfg, extra):
    with pytest.raises(ConfigError, match="data.share_prompt=true"):
        validate(make_cfg("data.share_prompt=true", *extra))


@pytest.mark.parametrize("extra, static, why", [
    ([], False, None),
    (["model.capacity_factor=1.25"], False, "the dropped MoE"),
    ([], True, "static shapes"),
    (["model.flash_attention=false"], False, None),  # eager takes the 4-D mask too
])
def test_auto_turns_itself_off_where_it_is_not_exact(make_cfg, extra, static, why, caplog):
    from moedpo.layout import use_shared_prompt

    cfg = make_cfg("model=tiny", *extra)
    assert cfg.data.share_prompt == "auto"
    policy, _ = build_models(cfg.model, seed=0)
    with caplog.at_level("INFO", logger="moedpo"):
        assert use_shared_prompt(cfg, static, policy) == (why is None)
    assert (f"shared prompt off (data.share_prompt=auto): {why}" in caplog.text) == bool(why)


def test_auto_is_off_for_an_attention_without_4d_masks(make_cfg, caplog):
    from moedpo.layout import use_shared_prompt

    cfg = make_cfg("model=tiny")
    policy, _ = build_models(cfg.model, seed=0)
    policy.config._attn_implementation = "flash_attention_2"
    with caplog.at_level("INFO", logger="moedpo"):
        assert not use_shared_prompt(cfg, False, policy)
    assert "attn_implementation=flash_attention_2, which takes no 4-D attention mask" in \
        caplog.text
    with pytest.raises(ConfigError, match="data.share_prompt=true is not exact with attn_"):
        use_shared_prompt(make_cfg("model=tiny", "data.share_prompt=true"), False, policy)


def windowed_model(name: str):
    """Tiny models whose attention slides over 4 tokens: in every layer (Mistral), or in
    some (Qwen2 with max_window_layers, Gemma 2 alternating)."""
    import transformers as tf

    small = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = {
        "mistral": lambda: tf.MistralConfig(**small, sliding_window=4),
        "qwen2": lambda: tf.Qwen2Config(**small, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1),
        "gemma2": lambda: tf.Gemma2Config(**small, head_dim=8, sliding_window=4),
    }[name]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma2"])
def test_shared_prompt_keeps_the_models_sliding_window(name):
    from moedpo.layout import sliding_window

    model = windowed_model(name)
    window, mixed = sliding_window(model.config)
    assert window == 4 and mixed == (name != "mistral")
    pairs = random_pairs(6, seed=2)  # up to 11 + 11 tokens: well past the window
    plain, _ = batch_logps(model, collate(pairs, pad_id=0), -100)
    shared, _ = batch_logps(model, collate_shared(pairs, pad_id=0), -100)
    torch.testing.assert_close(shared.logps, plain.logps, rtol=0, atol=1e-5)
