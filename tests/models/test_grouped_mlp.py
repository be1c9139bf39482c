"""The routed expert MLP's hand-written backward equals autograd's, in float64, for any gate,
and keeps only the [gate; up] projection of each slot."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moedpo.models.expert_layout import LowRank, expert_weights
from moedpo.models.grouped_mlp import routed_expert_mlp


class Experts(nn.Module):
    """transformers' fused experts layout; `biased_transposed`: gpt-oss's ([E, in, out]
    weights with biases)."""

    def __init__(self, num_experts: int, hidden: int, inner: int, gate,
                 biased_transposed: bool = False) -> None:
        super().__init__()
        gate_up = torch.randn(num_experts, 2 * inner, hidden, dtype=torch.float64) / hidden**0.5
        down = torch.randn(num_experts, hidden, inner, dtype=torch.float64) / inner**0.5
        self.is_transposed = self.has_bias = biased_transposed
        if biased_transposed:
            gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
            self.gate_up_proj_bias = nn.Parameter(torch.randn(num_experts, 2 * inner,
                                                              dtype=torch.float64))
            self.down_proj_bias = nn.Parameter(torch.randn(num_experts, hidden,
                                                           dtype=torch.float64))
        self.gate_up_proj, self.down_proj = nn.Parameter(gate_up), nn.Parameter(down)
        self.gate = gate

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.gate(gate) * up


def autograd_reference(hidden, slot_token, slot_weight, counts, experts):
    """Written from the stored layout directly (x @ W for [in, out] weights), not from
    moedpo's canonical view."""
    outs = []
    for e, x in enumerate(hidden[slot_token].split(counts)):
        if experts.is_transposed:
            gated = experts._apply_gate(x @ experts.gate_up_proj[e]
                                        + experts.gate_up_proj_bias[e])
            outs.append(gated @ experts.down_proj[e] + experts.down_proj_bias[e])
        else:
            gated = experts._apply_gate(F.linear(x, experts.gate_up_proj[e]))
            outs.append(F.linear(gated, experts.down_proj[e]))
    return torch.cat(outs) * slot_weight[:, None]


def routed(hidden, slot_token, slot_weight, counts, experts):
    return routed_expert_mlp(hidden, slot_token, slot_weight, counts, expert_weights(experts))


def routing(tokens: int, top_k: int, num_experts: int, empty: int):
    """Slots sorted by expert, expert `empty` chosen by nobody."""
    choices = [e for e in range(num_experts) if e != empty]
    top_k_index = torch.stack([torch.tensor(choices)[torch.randperm(len(choices))[:top_k]]
                               for _ in range(tokens)])
    order = torch.argsort(top_k_index.reshape(-1), stable=True)
    counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).tolist()
    return order // top_k, counts


@pytest.mark.parametrize("layout", [False, True], ids=["fused", "biased_transposed"])
@pytest.mark.parametrize("gate", [F.silu, torch.tanh], ids=["silu", "tanh"])
def test_output_and_every_gradient_equal_autograd_float64(gate, layout):
    torch.manual_seed(0)
    experts = Experts(num_experts=5, hidden=12, inner=8, gate=gate, biased_transposed=layout)
    slot_token, counts = routing(tokens=9, top_k=2, num_experts=5, empty=3)
    assert counts[3] == 0
    hidden = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    slot_weight = torch.rand(len(slot_token), dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(len(slot_token), 12, dtype=torch.float64)
    inputs = (hidden, slot_weight, experts.gate_up_proj, experts.down_proj)
    names = ["hidden", "slot_weight", "gate_up", "down"]
    if layout:
        inputs += (experts.gate_up_proj_bias, experts.down_proj_bias)
        names += ["gate_up_bias", "down_bias"]

    ours = routed(hidden, slot_token, slot_weight, counts, experts)
    ours_grads = torch.autograd.grad(ours, inputs, upstream)
    ref = autograd_reference(hidden, slot_token, slot_weight, counts, experts)
    ref_grads = torch.autograd.grad(ref, inputs, upstream)

    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for name, got, want in zip(names, ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)
    assert all(grad[3].abs().sum() == 0 for grad in ours_grads[2:])  # nobody chose expert 3


def test_frozen_weights_get_no_gradient_and_inputs_still_do():
    torch.manual_seed(1)
    experts = Experts(4, 6, 5, F.silu).requires_grad_(False)
    slot_token, counts = routing(7, 2, 4, empty=0)
    hidden = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    slot_weight = torch.rand(len(slot_token), dtype=torch.float64)
    out = routed(hidden, slot_token, slot_weight, counts, experts)
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    (want,) = torch.autograd.grad(
        autograd_reference(hidden, slot_token, slot_weight, counts, experts).sum(), hidden)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)
    assert experts.gate_up_proj.grad is None


def test_keeps_only_gate_up_besides_inputs():
    """What the backward holds: the caller's tensors (no copies) and one [slots, 2I] tensor;
    autograd itself would also hold the gathered rows, the gate, the gated product and the
    unweighted output."""
    torch.manual_seed(2)
    experts = Experts(4, 16, 32, F.silu)
    slot_token, counts = routing(10, 2, 4, empty=1)
    hidden = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    slot_weight = torch.rand(len(slot_token), dtype=torch.float64, requires_grad=True)
    given = {t.untyped_storage().data_ptr() for t in
             (hidden, slot_weight, slot_token, experts.gate_up_proj, experts.down_proj)}

    def kept_bytes(fn) -> int:
        kept = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in given:
                kept[storage.data_ptr()] = storage.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(hidden, slot_token, slot_weight, counts, experts)
        return sum(kept.values())

    slots = len(slot_token)
    assert kept_bytes(routed) == slots * 2 * 32 * 8
    assert kept_bytes(autograd_reference) > 2 * slots * 2 * 32 * 8


@pytest.mark.parametrize("layout", [False, True], ids=["fused", "biased_transposed"])
def test_low_rank_factors_equal_autograd_on_the_folded_weights_float64(layout):
    """Under expert LoRA the Function adds s (x A_e^T) B_e^T to each projection: output and
    the gradients of hidden, routing weights and all four factors equal autograd through
    W_e + s B_e A_e, and the frozen base weights get none."""
    torch.manual_seed(3)
    experts = Experts(5, 12, 8, F.silu, biased_transposed=layout).requires_grad_(False)
    slot_token, counts = routing(9, 2, 5, empty=2)
    hidden = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    slot_weight = torch.rand(len(slot_token), dtype=torch.float64, requires_grad=True)
    base = expert_weights(experts)
    rank = 3

    def factors(w):
        return LowRank(torch.randn(5, rank, w.shape[2], dtype=torch.float64).requires_grad_(),
                       torch.randn(5, w.shape[1], rank, dtype=torch.float64).requires_grad_(),
                       scale=0.7)
    w = dataclasses.replace(base, first_lora=factors(base.first), down_lora=factors(base.down))
    leaves = (hidden, slot_weight, w.first_lora.a, w.first_lora.b, w.down_lora.a, w.down_lora.b)
    upstream = torch.randn(len(slot_token), 12, dtype=torch.float64)

    ours = routed_expert_mlp(hidden, slot_token, slot_weight, counts, w)
    ours_grads = torch.autograd.grad(ours, leaves, upstream)
    first, down = (m + lr.scale * lr.b @ lr.a for m, lr in ((w.first, w.first_lora),
                                                            (w.down, w.down_lora)))
    outs = []
    for e, x in enumerate(hidden[slot_token].split(counts)):
        gate_up = F.linear(x, first[e], None if w.first_bias is None else w.first_bias[e])
        outs.append(F.linear(w.activate(gate_up), down[e],
                             None if w.down_bias is None else w.down_bias[e]))
    ref = torch.cat(outs) * slot_weight[:, None]
    ref_grads = torch.autograd.grad(ref, leaves, upstream)

    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    names = ["hidden", "slot_weight", "first_a", "first_b", "down_a", "down_b"]
    for name, got, want in zip(names, ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)
    assert all(g[2].abs().sum() == 0 for g in ours_grads[2:])  # nobody chose expert 2
    assert (ours - routed(hidden, slot_token, slot_weight, counts, experts)).abs().max() > 1e-3
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
