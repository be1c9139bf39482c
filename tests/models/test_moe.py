"""MoE experts implementations against the original's fixture and Hugging Face's own module."""

import copy

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

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


def test_claim_places_token_major():
    assert claim_places(torch.tensor([[[1, 0], [0, 1], [0, 2]]]), 3).tolist() == [
        [[0, 0], [1, 1], [2, 0]]]


def test_capacity_rounding():
    assert capacity(10, 2, 8, 1.0) == 2 and capacity(10, 2, 8, 1.0, "ceil") == 3
    assert capacity(3, 1, 8, 1.0) == 0 and capacity(3, 1, 8, 1.0, "ceil") == 1


def moe_block(seed=0, experts=8, top_k=2, hidden=32):
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=hidden, intermediate_size=48, num_local_experts=experts,
                           num_experts_per_tok=top_k)
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


class Holder(torch.nn.Module):
    """apply_moe_implementation works on models; wrap a lone block like one."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.config = block.experts.config

    def set_experts_implementation(self, name):
        self.config._experts_implementation = name


def run_block(block, x, impl, factor=0.0):
    block = copy.deepcopy(block)
    apply_moe_implementation(Holder(block), impl, factor)
    x = x.clone().requires_grad_(True)
    out = block(x)
    out.pow(2).sum().backward()
    return out, x.grad, block.experts.gate_up_proj.grad, block.gate.weight.grad


@pytest.mark.parametrize("impl, factor", [("dense", 0.0), ("dropped", 4.0), ("dropped", 8.0)])
def test_no_drop_paths_equal_hf_eager(impl, factor):
    """dense, and dropped with capacity_factor >= E/k, equal HF's eager experts, grads too."""
    block, x = moe_block(), torch.randn(3, 10, 32, dtype=torch.double)
    expected = run_block(block, x, "hf")
    got = run_block(block, x, impl, factor)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dropped_matches_float64_reference():
    """Against an independent per-token loop with the kept mask of `kept_slots`."""
    block, x = moe_block(seed=1), torch.randn(2, 12, 32, dtype=torch.double)
    out, *_ = run_block(block, x, "dropped", 1.0)
    flat = x.view(-1, 32)
    _, weights, index = block.gate(flat)
    slots = capacity(12, 2, 8, 1.0)
    kept = kept_slots(index.view(2, 12, 2), 8, slots).view(-1, 2)
    assert 0 < (~kept).sum() and (~kept.any(-1)).any(), "fixture should drop, fully too"
    experts = block.experts
    expected = []
    for t in range(flat.shape[0]):
        if not kept[t].any():
            expected.append(flat[t])
            continue
        acc = torch.zeros(32, dtype=torch.double)
        for r in range(2):
            if kept[t, r]:
                e = index[t, r]
                gate, up = (experts.gate_up_proj[e] @ flat[t]).chunk(2)
                acc += weights[t, r] * (experts.down_proj[e] @ (torch.nn.functional.silu(gate)
                                                                 * up))
        expected.append(acc)
    torch.testing.assert_close(out.view(-1, 32), torch.stack(expected).detach(), rtol=1e-9,
                               atol=1e-9)


def test_dropped_capacity_is_per_sequence():
    """A sequence's output must not depend on what else is in the batch."""
    block = moe_block(seed=2)
    x = torch.randn(3, 8, 32, dtype=torch.double)
    together, *_ = run_block(block, x, "dropped", 1.0)
    alone, *_ = run_block(block, x[1:2], "dropped", 1.0)
    torch.testing.assert_close(together[1:2], alone)
