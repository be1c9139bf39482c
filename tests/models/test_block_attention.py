"""models.block_attention: per-pair SDPA over shared-prompt and packed rows equals SDPA under
the dense segment mask (outputs and gradients), and the models moedpo loads use it."""

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import random_pairs, tiny_policy
from moedpo.data import collate, collate_shared
from moedpo.data.tokenize import TokenizedPair
from moedpo.layout import attention_blocks, shared_prompt_mask
from moedpo.models import block_attention
from moedpo.step import batch_logps


def ragged_pairs(n: int, seed: int) -> list[TokenizedPair]:
    """Pairs of very different shapes: one-token prompts (no shared part), one-token and
    long responses."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(1, 50) for _ in range(rng.randrange(lo, hi))]
    return [TokenizedPair(ids(1, 30), ids(1, 12), ids(1, 12)) for _ in range(n)]


def layout(batch) -> tuple:
    return tuple(tuple(b) for b in batch["blocks"].tolist())


@pytest.mark.parametrize("max_tokens", [0, 60, 10_000], ids=["one-per-row", "packed", "one-row"])
def test_blocks_equal_sdpa_under_the_dense_mask_in_float64(max_tokens):
    pairs = ragged_pairs(9, seed=max_tokens)
    pairs[0] = TokenizedPair([7], [8], [9, 10])  # no shared prompt at all
    batch = collate_shared(pairs, pad_id=0, max_tokens=max_tokens)
    rows, length = batch["input_ids"].shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, 4, length, 8, generator=gen, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    mask = shared_prompt_mask(batch["segments"], torch.float64, pair_ids=batch["pair_ids"])
    real = (batch["segments"] != 3)[:, None, :, None]
    weigh = torch.randn(rows, 4, length, 8, generator=gen, dtype=torch.float64) * real
    outs = []
    for run in (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
                lambda: block_attention.block_attention(q, k, v, layout(batch), scale=0.3)):
        out = run()
        q.grad = k.grad = v.grad = None
        (out * weigh).sum().backward()
        outs.append((out * real, [t.grad.clone() for t in (q, k, v)]))
    (dense, dense_grads), (blocks, block_grads) = outs
    torch.testing.assert_close(blocks, dense, rtol=0, atol=1e-12)
    for got, want in zip(block_grads, dense_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_wrong_mask_would_be_caught():
    """The comparison above can fail: rejected tokens that also saw the chosen ones differ."""
    batch = collate_shared([TokenizedPair([1, 2, 3], [4, 5], [6, 7])], pad_id=0)
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    blocks = block_attention.block_attention(q, k, v, layout(batch))
    assert torch.allclose(blocks[:, :, :5], causal[:, :, :5])  # prompt + chosen: causal
    assert not torch.allclose(blocks[:, :, 5:], causal[:, :, 5:])


def test_a_gap_in_a_row_is_an_error():
    q = torch.zeros(1, 1, 8, 2)
    with pytest.raises(ValueError, match="row 0 has a gap before token 3"):
        block_attention.block_attention(q, q, q, [(0, 3, 1, 1, 1)])


def test_moedpo_loads_sdpa_as_block_attention_and_batch_logps_uses_it(monkeypatch):
    policy, eager = tiny_policy(), tiny_policy(sdpa=False)
    assert policy.config._attn_implementation == block_attention.NAME
    assert eager.config._attn_implementation == "eager"
    calls = []
    real = block_attention.block_attention.__wrapped__
    monkeypatch.setattr(block_attention, "block_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    pairs = random_pairs(6, seed=3)
    packed = collate_shared(pairs, pad_id=0, max_tokens=10_000)
    assert packed["input_ids"].shape[0] == 1
    got, _ = batch_logps(policy, packed, -100)
    assert len(calls) == policy.config.num_hidden_layers
    want, _ = batch_logps(eager, collate(pairs, pad_id=0), -100)
    torch.testing.assert_close(got.logps, want.logps, rtol=0, atol=1e-5)
    assert attention_blocks(eager, packed) is None  # eager: the dense mask
    assert attention_blocks(policy, collate(pairs, pad_id=0)) is None  # plain rows


def test_a_window_shorter_than_a_sequence_needs_the_dense_mask():
    from test_shared_prompt import windowed_model

    model = windowed_model("mistral")
    model.config._attn_implementation = block_attention.NAME
    window = model.config.sliding_window
    short = [TokenizedPair([1] * (window - 1), [2], [3]) for _ in range(2)]  # window tokens
    long = [TokenizedPair([1] * window, [2] * 2, [3])]
    assert attention_blocks(model, collate_shared(short, pad_id=0)) is not None
    assert attention_blocks(model, collate_shared(long, pad_id=0)) is None
    pairs = random_pairs(6, seed=2)
    plain, _ = batch_logps(model, collate(pairs, pad_id=0), -100)
    packed, _ = batch_logps(model, collate_shared(pairs, pad_id=0, max_tokens=40), -100)
    torch.testing.assert_close(packed.logps, plain.logps, rtol=0, atol=1e-5)


def test_gradients_under_activation_checkpointing_equal_without():
    """The layout rides in the forward's keywords, so the recomputed forward has it too."""
    from moedpo.parallel.layers import checkpoint_decoder_layers

    pairs = random_pairs(6, seed=4)
    batch = collate_shared(pairs, pad_id=0, max_tokens=10_000)
    grads = []
    for checkpointed in (False, True):
        policy = tiny_policy()
        policy.train()
        if checkpointed:
            checkpoint_decoder_layers(policy)
        logps, _ = batch_logps(policy, batch, -100)
        (logps.logps * torch.linspace(-1, 1, 12)).sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_blocks_are_as_close_to_float64_as_the_dense_mask():
    """In a bf16 policy the per-pair products round no worse than the dense masked one."""
    pairs = random_pairs(8, seed=5)
    batch = collate_shared(pairs, pad_id=0, max_tokens=10_000)
    reference, _ = batch_logps(tiny_policy().double(), batch, -100)
    errors = {}
    for name, sdpa in (("blocks", True), ("dense", False)):
        model = tiny_policy(sdpa).to(torch.bfloat16)
        with torch.no_grad():
            logps, _ = batch_logps(model, batch, -100)
        errors[name] = (logps.logps.double() - reference.logps).abs().max().item()
    assert errors["blocks"] <= 2 * errors["dense"] + 1e-2, errors


def test_score_terms_the_blocks_cannot_apply_are_refused():
    q = torch.zeros(1, 1, 3, 2)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="passes s_aux to its attention"):
        block_attention.block_attention_forward(module, q, q, q, None,
                                                moedpo_blocks=[(0, 0, 1, 1, 1)],
                                                s_aux=torch.zeros(1))
