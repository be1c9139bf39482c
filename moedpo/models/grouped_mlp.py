"""Routed expert MLPs, one matmul per expert, with a hand-written backward that keeps less
in memory than autograd would.

Autograd keeps, per routed slot, the gathered expert input, the fused [gate; up]
projection, the activation's output, the gated product (the down projection's input) and
the unweighted expert output (for the routing weight's gradient), and its backward builds
each expert's weight gradient separately before stacking them. This Function keeps the
[gate; up] projection only (the token rows are gathered again from the layer input, which
the router keeps anyway), computes the gate again in the backward (elementwise, cheap next
to the matmuls), and writes every expert's weight gradient straight into one [E, ...]
tensor. It runs the matmuls autograd runs, no more. The gate is the experts module's own
`_apply_gate`, differentiated by autograd, so any gated activation works.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F


class RoutedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, slot_weight: torch.Tensor, gate_up_proj: torch.Tensor,
                down_proj: torch.Tensor, slot_token: torch.Tensor, counts: list[int],
                apply_gate: Callable) -> torch.Tensor:
        out = hidden.new_empty(slot_token.shape[0], hidden.shape[1])
        gate_ups = []
        for e, rows in _expert_rows(counts):
            gate_up = F.linear(hidden[slot_token[rows]], gate_up_proj[e])
            gate_ups.append(gate_up)
            torch.mm(apply_gate(gate_up), down_proj[e].t(), out=out[rows])
        out.mul_(slot_weight[:, None])
        ctx.save_for_backward(hidden, slot_weight, gate_up_proj, down_proj, slot_token,
                              *gate_ups)
        ctx.counts, ctx.apply_gate = counts, apply_gate
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, slot_weight, gate_up_proj, down_proj, slot_token, *gate_ups = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if need[0] else None
        # Every slot and every routed expert's weights are written below; only the experts
        # nobody chose need zeros.
        grad_weight = torch.empty_like(slot_weight) if need[1] else None
        grad_gate_up = torch.empty_like(gate_up_proj) if need[2] else None
        grad_down = torch.empty_like(down_proj) if need[3] else None
        idle = [e for e, n in enumerate(ctx.counts) if n == 0]
        for grad in (grad_gate_up, grad_down):
            if grad is not None and idle:
                grad[idle] = 0
        for (e, rows), gate_up in zip(_expert_rows(ctx.counts), gate_ups, strict=True):
            go, weight, tokens = grad_out[rows], slot_weight[rows, None], slot_token[rows]
            with torch.enable_grad():
                gate_up = gate_up.detach().requires_grad_()
                gated = ctx.apply_gate(gate_up)
            grad_gated = go @ down_proj[e]  # gradient of the unweighted output's input
            if need[1]:  # d(w * gated @ Wd^T)/dw . g = gated . (g @ Wd)
                grad_weight[rows] = (grad_gated * gated.detach()).sum(-1)
            if need[3]:
                torch.mm((go * weight).t(), gated.detach(), out=grad_down[e])
            if need[0] or need[2]:
                (grad_pre,) = torch.autograd.grad(gated, gate_up, grad_gated * weight)
                if need[2]:
                    torch.mm(grad_pre.t(), hidden[tokens], out=grad_gate_up[e])
                if need[0]:
                    grad_hidden.index_add_(0, tokens, grad_pre @ gate_up_proj[e])
        return grad_hidden, grad_weight, grad_gate_up, grad_down, None, None, None


def _expert_rows(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, its rows) for each expert that has any."""
    ends = itertools.accumulate(counts)
    return [(e, slice(end - n, end))
            for e, (n, end) in enumerate(zip(counts, ends, strict=True)) if n]


# Left out of torch.compile (model.compile): the graph would be specialised on every
# expert's row count, so each batch and layer would compile again; per-expert matmuls have
# nothing to fuse.
@torch.compiler.disable
def routed_expert_mlp(hidden: torch.Tensor, slot_token: torch.Tensor, slot_weight: torch.Tensor,
                      counts: list[int], experts: torch.nn.Module) -> torch.Tensor:
    """Routing slots sorted by expert (`counts[e]` slots for expert e), slot i reading token
    row `slot_token[i]` of `hidden` [T, H] -> [slots, H]: each slot's expert output times
    its routing weight `slot_weight[i]`. Weights as transformers' fused experts hold them:
    gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    return RoutedExpertMLP.apply(hidden, slot_weight, experts.gate_up_proj, experts.down_proj,
                                 slot_token, counts, experts._apply_gate)
