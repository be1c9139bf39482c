"""data.packing: several pairs per row, kept apart by the mask; log-probs, gradients, router
losses and whole training runs equal the unpacked computation (the per-batch log-prob and
gradient equality on the tiny Mixtral and GPT-NeoX is test_shared_prompt's, packed)."""

import pytest
import torch

from conftest import assert_same_run, random_pairs, tiny_policy, tiny_train_overrides
from moedpo.config import ConfigError
from moedpo.data import collate, collate_shared
from moedpo.data.collate import SEGMENT_CHOSEN, SEGMENT_PROMPT, SEGMENT_REJECTED, pack_rows
from moedpo.data.tokenize import TokenizedPair
from moedpo.layout import attention_blocks, shared_prompt_mask
from moedpo.step import batch_logps


def test_first_fit_decreasing_by_hand():
    rows = pack_rows([5, 9, 3, 4, 6], max_tokens=10)
    # 9 -> row 0 (1 left); 6 -> row 1 (4 left); 5 -> row 2; 4 -> row 1 (0 left); 3 -> row 2
    assert rows == [[1], [4, 3], [0, 2]]
    assert pack_rows([12, 3], max_tokens=10) == [[0], [1]]  # too long alone: its own row
    assert pack_rows([5, 9, 3], max_tokens=0) == [[0], [1], [2]]


def test_packed_layout_by_hand():
    a = TokenizedPair([5, 6, 7], [8, 9], [10])
    b = TokenizedPair([20, 21], [22], [23, 24])
    batch = collate_shared([a, b], pad_id=0, max_tokens=20)
    P, C, R = SEGMENT_PROMPT, SEGMENT_CHOSEN, SEGMENT_REJECTED
    # a's block (8 tokens) first (longest), then b's (6): one row of 14.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10, 20, 21, 22, 21, 23, 24]]
    assert batch["segments"].tolist() == [[P, P, C, C, C, R, R, P, C, C, R, R, R]]
    assert batch["pair_ids"].tolist() == [[0] * 7 + [1] * 6]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, -100, 10,
                                         -100, -100, 22, -100, 23, 24]]
    assert batch["pair_rows"].tolist() == [0, 0]
    allowed = shared_prompt_mask(batch["segments"], torch.float32,
                                 pair_ids=batch["pair_ids"])[0, 0] == 0
    assert not allowed[7:, :7].any()  # b never sees a
    assert allowed[9, 7:10].tolist() == [True, True, True] and not allowed[11, 8:10].any()


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma2"])
def test_packing_keeps_the_models_sliding_window(name):
    from test_shared_prompt import windowed_model

    model = windowed_model(name)
    pairs = random_pairs(6, seed=2)
    plain, _ = batch_logps(model, collate(pairs, pad_id=0), -100)
    packed, _ = batch_logps(model, collate_shared(pairs, pad_id=0, max_tokens=40), -100)
    torch.testing.assert_close(packed.logps, plain.logps, rtol=0, atol=1e-5)


def test_training_with_packing_equals_plain(make_cfg, tmp_path):
    from moedpo.trainer import run

    common = [*tiny_train_overrides(), "max_steps=4", "shuffle=true",
              "model.router_aux_loss_coef=0.05"]
    run(make_cfg(*common, "exp_name=plain", "data.share_prompt=false"))
    run(make_cfg(*common, "exp_name=packed", "data.packing=true", "data.max_tokens_per_row=160"))
    assert_same_run(tmp_path / "plain", tmp_path / "packed", atol=1e-5)


def test_packing_needs_the_shared_layout(make_cfg):
    from moedpo.validate import validate

    with pytest.raises(ConfigError, match="data.packing=true packs shared-prompt rows"):
        validate(make_cfg("data.packing=true", "data.share_prompt=false"))


def test_packing_auto_packs_where_attention_runs_per_pair(make_cfg, caplog):
    """auto: the whole micro-batch in one row under moedpo_sdpa; off, with one info line,
    where a dense mask would cost attention over the whole packed row."""
    import sys

    from test_shared_prompt import windowed_model

    from moedpo.layout import packing_budget

    per_pair, eager = tiny_policy(), tiny_policy(sdpa=False)
    cfg = make_cfg()
    assert cfg.data.packing == "auto"
    assert packing_budget(cfg, True, per_pair) == sys.maxsize
    assert packing_budget(cfg, False, per_pair) == 0  # no shared prompt, nothing to pack
    assert packing_budget(make_cfg("data.max_tokens_per_row=300"), True, per_pair) == 300
    assert packing_budget(make_cfg("data.packing=false"), True, per_pair) == 0
    with caplog.at_level("INFO", logger="moedpo"):
        assert packing_budget(cfg, True, eager) == 0
    assert "packing off (data.packing=auto): attn_implementation=eager" in caplog.text
    assert packing_budget(make_cfg("data.packing=true"), True, eager) == 2 * cfg.max_length
    windowed = windowed_model("mistral")  # a 4-token window: the blocks cannot apply
    windowed.config._attn_implementation = per_pair.config._attn_implementation
    assert packing_budget(cfg, True, windowed) == 0
    with pytest.raises(ConfigError, match="data.packing=true packs shared-prompt rows"):
        packing_budget(make_cfg("data.packing=true"), False, per_pair)


def test_default_batches_are_one_packed_row(make_cfg):
    """What the trainer builds by default for the tiny Mixtral: one row per micro-batch."""

    from moedpo.layout import batch_maker, packing_budget, use_shared_prompt
    from moedpo.parallel import make_strategy
    from moedpo.parallel.backend import Backend

    cfg, policy = make_cfg("per_device_train_batch_size=4"), tiny_policy()
    shared = use_shared_prompt(cfg, False, policy)

    class Tok:
        pad_token_id = 0
    to_batch = batch_maker(cfg, Tok(), make_strategy(cfg, Backend("cpu", torch.device("cpu"))),
                           shared,
                           packing_budget(cfg, shared, policy))
    batch = to_batch(random_pairs(4, seed=0))
    assert batch["input_ids"].shape[0] == 1 and (batch["attention_mask"] == 1).all()
    assert batch["blocks"].device.type == "cpu" and attention_blocks(policy, batch) is not None


def test_static_shapes_bin_pack_into_fixed_rows(make_cfg, tmp_path):
    """data.packing=true under static shapes: shared-prompt blocks bin-packed into rows of
    exactly 2 x max_length tokens, the row count rounded up to a multiple of the devices;
    the run equals the plain static layout (what XLA runs without packing)."""
    from moedpo.trainer import run

    common = [*tiny_train_overrides(), "max_steps=4", "shuffle=true", "max_length=64",
              "max_prompt_length=32", "data.static_shapes=true",
              "model.moe_implementation=dense", "model.router_aux_loss_coef=0.05"]
    run(make_cfg(*common, "exp_name=plain"))
    run(make_cfg(*common, "exp_name=packed", "data.packing=true"))
    assert_same_run(tmp_path / "plain", tmp_path / "packed", atol=1e-5, rel=1e-4)
    batch = collate_shared(random_pairs(5, seed=1), pad_id=0, pad_to=128, max_tokens=128,
                           row_multiple=4)
    assert batch["input_ids"].shape == (4, 128)
    assert (batch["segments"][-1] == 3).all()  # a row of padding only


@pytest.mark.parametrize(("overrides", "line"), [
    ([], "rows: prompts shared, each micro-batch packed into one row; attention moedpo_sdpa, "
         "per pair"),
    (["model.attn_implementation=eager"], "rows: one per pair, prompt shared; attention eager"),
    (["data.share_prompt=false", "data.tokens_per_batch=400"],
     "rows: two per pair (chosen, rejected), prompt in both; attention moedpo_sdpa; forwards "
     "of at most 400 tokens"),
])
def test_startup_names_the_row_layout(make_cfg, caplog, overrides, line):
    from moedpo.trainer import run

    with caplog.at_level("INFO", logger="moedpo"):
        run(make_cfg(*tiny_train_overrides(), "max_steps=1", "do_first_eval=false",
                     *overrides))
    assert line in caplog.text
