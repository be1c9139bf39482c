"""MoE experts implementations against the original's fixture, hand-worked cases, a float64
per-token loop and Hugging Face's own experts module."""

import copy

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import moedpo.models.moe as moe
from moedpo.models.moe import apply_moe_implementation, capacity, claim_places, kept_slots

# The original trainer's token-dropping test (B=4, S=4, k=2, E=8, capacity_factor=2 -> C=2).
FIXTURE_INDEX = [[[5, 0], [0, 4], [1, 0], [5, 3]], [[2, 1], [1, 4], [0, 5], [7, 1]],
                 [[6, 2], [2, 3], [4, 2], [2, 1]], [[4, 1], [7, 0], [5, 0], [4, 7]]]
FIXTURE_KEPT = [[[1, 1], [1, 1], [1, 0], [1, 1]], [[1, 1], [1, 1], [1, 1], [1, 0]],
                [[1, 1], [1, 1], [1, 0], [0, 1]], [[1, 1], [1, 1], [1, 1], [1, 1]]]


def test_original_fixture():
    slots = capacity(seq_len=4, top_k=2, num_experts=8, factor=2.0)
    assert slots == 2
    kept = kept_slots(torch.tensor(FIXTURE_INDEX), num_experts=8, slots=slots)
    assert kept.int().tolist() == FIXTURE_KEPT


def test_claim_places_token_major_and_padding_claims_nothing():
    index = torch.tensor([[[1, 0], [0, 1], [0, 2]]])
    assert claim_places(index, 3).tolist() == [[[0, 0], [1, 1], [2, 0]]]
    mask = torch.tensor([[False, True, True]])  # left padding: token 0 is a pad
    assert claim_places(index, 3, mask).tolist() == [[[-1, -1], [0, 0], [1, 0]]]


def test_capacity_rounding():
    assert capacity(10, 2, 8, 1.0) == 2 and capacity(10, 2, 8, 1.0, "ceil") == 3
    assert capacity(3, 1, 8, 1.0) == 0 and capacity(3, 1, 8, 1.0, "ceil") == 1
    # 400 * 2 / 8 * 1.1 is exactly 110 (110.00000000000001 in floating point).
    assert capacity(400, 2, 8, 1.1, "ceil") == 110 and capacity(401, 2, 8, 1.1, "ceil") == 111
    assert capacity(400, 2, 8, 1.1) == int(400 * 2 / 8 * 1.1)  # floor keeps the original's


class Model(torch.nn.Module):
    """The smallest 'model' apply_moe_implementation accepts: one MoE block."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.config = block.experts.config

    def set_experts_implementation(self, name):
        self.config._experts_implementation = name

    def forward(self, x, attention_mask=None):
        return self.block(x)


def moe_block(seed=0, experts=8, top_k=2, hidden=32, dtype=torch.double, std=0.3):
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=hidden, intermediate_size=48, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config).to(dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=std)
    return block


def run_block(block, x, impl, factor=0.0, mask=None, ignore_padding=True):
    model = Model(copy.deepcopy(block))
    apply_moe_implementation(model, impl, factor, ignore_padding=ignore_padding)
    x = x.clone().requires_grad_(True)
    out = model(x, attention_mask=mask)
    out.float().pow(2).sum().backward()
    return out, x.grad, model.block.experts.gate_up_proj.grad, model.block.gate.weight.grad


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("experts, top_k", [(8, 1), (8, 2), (4, 3), (16, 4)])
@pytest.mark.parametrize("impl, factor", [("dropless", 0.0), ("dense", 0.0), ("dropped", 16.0)])
def test_exact_paths_equal_hf_eager_fp32(seed, experts, top_k, impl, factor):
    """dropless, dense, and dropped with capacity_factor >= E/k equal HF's eager experts:
    outputs and gradients, fp32, max abs difference below 1e-5."""
    block = moe_block(seed, experts, top_k, dtype=torch.float32, std=0.1)
    x = torch.randn(3, 7 + seed, 32)
    for got, expected in zip(run_block(block, x, impl, factor), run_block(block, x, "hf"),
                             strict=True):
        assert (got - expected).abs().max().item() < 1e-5


def test_ties_and_empty_experts():
    """A zero router ties every expert: top-k picks the same ones for all tokens and the
    other experts receive nothing."""
    block = moe_block(experts=8, top_k=2)
    torch.nn.init.zeros_(block.gate.weight)
    x = torch.randn(2, 5, 32, dtype=torch.double)
    for impl, factor in (("dropless", 0.0), ("dense", 0.0), ("dropped", 8.0)):
        for got, expected in zip(run_block(block, x, impl, factor), run_block(block, x, "hf"),
                                 strict=True):
            torch.testing.assert_close(got, expected)


def test_dropless_keeps_no_routed_copy_of_the_output():
    """Besides the experts' [gate; up] per slot, the dropless path keeps only index tensors
    and the routing weights: no float tensor of [slots, H] (the un-permuting step once kept the
    expert output, 1.25 MB per layer on the throughput benchmark's tiny model)."""
    block = moe_block(experts=8, top_k=2)
    experts = block.experts
    apply_moe_implementation(Model(block), "dropless")
    tokens, top_k, inner = 12, 2, experts.down_proj.shape[-1]
    hidden = torch.randn(tokens, 32, dtype=torch.double, requires_grad=True)
    top_k_index = torch.stack([torch.randperm(8)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, dtype=torch.double, requires_grad=True)
    given = {t.untyped_storage().data_ptr()
             for t in (hidden, weights, experts.gate_up_proj, experts.down_proj)}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in given:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        moe.dropless_experts_forward(experts, hidden, top_k_index, weights)
    slots = tokens * top_k
    assert sum(kept.values()) == slots * 2 * inner * 8 + slots * 8  # gate_up + sorted weights


def test_bf16_error_no_worse_than_hf():
    block64 = moe_block(seed=3)
    x64 = torch.randn(2, 64, 32, dtype=torch.double)
    exact = run_block(block64, x64, "hf")[0]
    block16, x16 = copy.deepcopy(block64).bfloat16(), x64.bfloat16()
    hf_err = (run_block(block16, x16, "hf")[0].double() - exact).abs().max()
    ours_err = (run_block(block16, x16, "dropless")[0].double() - exact).abs().max()
    assert ours_err <= 1.5 * hf_err


def per_token_reference(block, x, kept):
    """float64 loop: weighted sum of kept experts; a token with no kept slot passes through."""
    flat = x.reshape(-1, x.shape[-1]).double()
    _, weights, index = block.gate(flat)
    experts, rows = block.experts, []
    for t in range(flat.shape[0]):
        if not kept[t].any():
            rows.append(flat[t])
            continue
        acc = torch.zeros_like(flat[t])
        for r in range(index.shape[1]):
            if kept[t, r]:
                e = index[t, r]
                gate, up = (experts.gate_up_proj[e] @ flat[t]).chunk(2)
                acc += weights[t, r] * (experts.down_proj[e]
                                        @ (torch.nn.functional.silu(gate) * up))
        rows.append(acc)
    return torch.stack(rows).detach()


def test_dropped_matches_float64_reference():
    block, x = moe_block(seed=1), torch.randn(2, 12, 32, dtype=torch.double)
    out, *_ = run_block(block, x, "dropped", 1.0)
    _, _, index = block.gate(x.reshape(-1, 32))
    kept = kept_slots(index.view(2, 12, 2), 8, capacity(12, 2, 8, 1.0)).view(-1, 2)
    assert (~kept).sum() > 0 and (~kept.any(-1)).any(), "the case should drop, fully too"
    torch.testing.assert_close(out.view(-1, 32), per_token_reference(block, x, kept))


def test_hand_worked_fully_dropped_token():
    """S=3, E=2, k=1, cf=1 -> C = int(3*1/2*1) = 1. The router sends every token to expert 0,
    so token 0 keeps its slot (weight 1 after top-1 renormalisation) and tokens 1 and 2 lose
    theirs: they leave the MoE block exactly as they entered it."""
    block = moe_block(experts=2, top_k=1)
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[0, 0] = 10.0
    x = torch.randn(1, 3, 32, dtype=torch.double)
    x[..., 0] = x[..., 0].abs() + 1  # positive on the router's feature: expert 0 wins
    out, *_ = run_block(block, x, "dropped", 1.0)
    experts = block.experts
    gate, up = (experts.gate_up_proj[0] @ x[0, 0]).chunk(2)
    expected0 = experts.down_proj[0] @ (torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(out[0, 0], expected0.detach())
    torch.testing.assert_close(out[0, 1:], x[0, 1:])


def test_dropped_experts_process_exactly_e_times_c_rows(monkeypatch):
    """The expert matmuls see a [E, B*C, H] buffer: work proportional to capacity, not to S."""
    shapes = []
    real = moe.all_experts_mlp
    monkeypatch.setattr(moe, "all_experts_mlp",
                        lambda w, x: shapes.append(tuple(x.shape)) or real(w, x))
    block, x = moe_block(), torch.randn(3, 40, 32, dtype=torch.double)
    run_block(block, x, "dropped", 1.25)
    slots = capacity(40, 2, 8, 1.25)  # 12
    assert shapes == [(8, 3 * slots, 32)]
    assert 8 * 3 * slots < 8 * 3 * 40  # vs the dense path: every expert on every token


def test_dropped_capacity_is_per_sequence():
    """A sequence's output must not depend on what else is in the batch."""
    block = moe_block(seed=2)
    x = torch.randn(3, 8, 32, dtype=torch.double)
    together, *_ = run_block(block, x, "dropped", 1.0)
    alone, *_ = run_block(block, x[1:2], "dropped", 1.0)
    torch.testing.assert_close(together[1:2], alone)


def test_padding_does_not_steal_capacity():
    """Left padding puts pads first in claim order; with moe_ignore_padding they claim no slot,
    so changing the pads cannot change a real token's output (and without it, it can)."""
    block = moe_block(seed=4)
    x = torch.randn(2, 10, 32, dtype=torch.double)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[:, :4] = 0
    other = x.clone()
    other[:, :4] = torch.randn(2, 4, 32, dtype=torch.double) * 5
    for ignore in (True, False):
        a, *_ = run_block(block, x, "dropped", 1.0, mask, ignore)
        b, *_ = run_block(block, other, "dropped", 1.0, mask, ignore)
        same = torch.allclose(a[:, 4:], b[:, 4:])
        assert same == ignore
