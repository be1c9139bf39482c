"""Routed expert MLPs, one matmul per expert, with a hand-written backward that keeps less
in memory than autograd would.

Autograd keeps, per routed slot, the gathered expert input, the fused [gate; up]
projection, the activation's output, the gated product (the down projection's input) and
the unweighted expert output (for the routing weight's gradient), and its backward builds
each expert's weight gradient separately before stacking them. This Function keeps the
[gate; up] projection only (the token rows are gathered again from the layer input, which
the router keeps anyway), computes the gate again in the backward (elementwise, cheap next
to the matmuls), and writes every expert's weight gradient straight into one [E, ...]
tensor. It runs the matmuls autograd runs, no more. The activation is the experts module's own
(`_apply_gate`, or `act_fn` for ungated experts), differentiated by autograd, so any
activation works (gpt-oss's clamped SwiGLU included); biases are optional inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .expert_layout import ExpertWeights


class RoutedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, slot_weight: torch.Tensor, first: torch.Tensor,
                down: torch.Tensor, first_bias: torch.Tensor | None,
                down_bias: torch.Tensor | None, slot_token: torch.Tensor, counts: list[int],
                activate: Callable) -> torch.Tensor:
        out = hidden.new_empty(slot_token.shape[0], hidden.shape[1])
        gate_ups = []
        for e, rows in _expert_rows(counts):
            gate_up = F.linear(hidden[slot_token[rows]], first[e],
                               None if first_bias is None else first_bias[e])
            gate_ups.append(gate_up)
            if down_bias is None:
                torch.mm(activate(gate_up), down[e].t(), out=out[rows])
            else:
                torch.addmm(down_bias[e], activate(gate_up), down[e].t(), out=out[rows])
        out.mul_(slot_weight[:, None])
        ctx.save_for_backward(hidden, slot_weight, first, down, down_bias, slot_token,
                              *gate_ups)
        ctx.counts, ctx.activate = counts, activate
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, slot_weight, first, down, down_bias, slot_token, *gate_ups = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if need[0] else None
        # Every slot and every routed expert's weights are written below; only the experts
        # nobody chose need zeros. Contiguous whatever the stored layout (a transposed view's
        # gradient is taken back to its parameter by autograd).
        grad_weight = torch.empty_like(slot_weight) if need[1] else None
        grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if need[i] else None
                 for i, t in ((2, first), (3, down))]
        grads += [torch.empty((first.shape[0], first.shape[1]), dtype=first.dtype,
                              device=first.device) if need[4] else None,
                  torch.empty_like(down_bias) if need[5] else None]
        grad_first, grad_down, grad_first_bias, grad_down_bias = grads
        idle = [e for e, n in enumerate(ctx.counts) if n == 0]
        for grad in grads:
            if grad is not None and idle:
                grad[idle] = 0
        for (e, rows), gate_up in zip(_expert_rows(ctx.counts), gate_ups, strict=True):
            go, weight, tokens = grad_out[rows], slot_weight[rows, None], slot_token[rows]
            with torch.enable_grad():
                gate_up = gate_up.detach().requires_grad_()
                gated = ctx.activate(gate_up)
            grad_gated = go @ down[e]  # gradient of the unweighted output's input
            if need[1]:  # d(w * (gated @ Wd^T + b))/dw . g = gated . (g @ Wd) + b . g
                grad_weight[rows] = (grad_gated * gated.detach()).sum(-1)
                if down_bias is not None:
                    grad_weight[rows] += go @ down_bias[e]
            if need[3]:
                torch.mm((go * weight).t(), gated.detach(), out=grad_down[e])
            if need[5]:
                grad_down_bias[e] = (go * weight).sum(0)
            if need[0] or need[2] or need[4]:
                (grad_pre,) = torch.autograd.grad(gated, gate_up, grad_gated * weight)
                if need[2]:
                    torch.mm(grad_pre.t(), hidden[tokens], out=grad_first[e])
                if need[4]:
                    grad_first_bias[e] = grad_pre.sum(0)
                if need[0]:
                    grad_hidden.index_add_(0, tokens, grad_pre @ first[e])
        return (grad_hidden, grad_weight, grad_first, grad_down, grad_first_bias,
                grad_down_bias, None, None, None)


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
                      counts: list[int], w: ExpertWeights) -> torch.Tensor:
    """Routing slots sorted by expert (`counts[e]` slots for expert e), slot i reading token
    row `slot_token[i]` of `hidden` [T, H] -> [slots, H]: each slot's expert output times
    its routing weight `slot_weight[i]`, weights in the canonical layout of
    models/expert_layout.py (any of transformers' layouts)."""
    return RoutedExpertMLP.apply(hidden, slot_weight, w.first, w.down, w.first_bias,
                                 w.down_bias, slot_token, counts, w.activate)
