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

Under LoRA on the experts (expert_layout.LowRank) each projection adds s (x A_e^T) B_e^T;
the Function keeps the two [slots, r] low-rank inputs besides, and computes the factors'
gradients and not the frozen base weights' (autograd asks for none).
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
                down_bias: torch.Tensor | None, first_a: torch.Tensor | None,
                first_b: torch.Tensor | None, down_a: torch.Tensor | None,
                down_b: torch.Tensor | None, slot_token: torch.Tensor, counts: list[int],
                activate: Callable, scales: tuple[float, float]) -> torch.Tensor:
        out = hidden.new_empty(slot_token.shape[0], hidden.shape[1])
        first_scale, down_scale = scales
        kept = []  # per expert: [gate; up], and the [slots, r] low-rank inputs under LoRA
        for e, rows in _expert_rows(counts):
            x = hidden[slot_token[rows]]
            gate_up = F.linear(x, first[e], None if first_bias is None else first_bias[e])
            x_a = None
            if first_a is not None:
                x_a = x @ first_a[e].t()
                gate_up.addmm_(x_a, first_b[e].t(), alpha=first_scale)
            gated = activate(gate_up)
            if down_bias is None:
                torch.mm(gated, down[e].t(), out=out[rows])
            else:
                torch.addmm(down_bias[e], gated, down[e].t(), out=out[rows])
            g_a = None
            if down_a is not None:
                g_a = gated @ down_a[e].t()
                out[rows].addmm_(g_a, down_b[e].t(), alpha=down_scale)
            kept += [gate_up] + [t for t in (x_a, g_a) if t is not None]
        out.mul_(slot_weight[:, None])
        ctx.save_for_backward(hidden, slot_weight, first, down, down_bias, first_a, first_b,
                              down_a, down_b, slot_token, *kept)
        ctx.counts, ctx.activate, ctx.scales = counts, activate, scales
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, slot_weight, first, down, down_bias, first_a, first_b, down_a, down_b, \
            slot_token, *kept = ctx.saved_tensors
        first_scale, down_scale = ctx.scales
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
        grads += [torch.empty(t.shape, dtype=t.dtype, device=t.device) if need[i] else None
                  for i, t in ((6, first_a), (7, first_b), (8, down_a), (9, down_b))]
        grad_first, grad_down, grad_first_bias, grad_down_bias = grads[:4]
        grad_first_a, grad_first_b, grad_down_a, grad_down_b = grads[4:]
        idle = [e for e, n in enumerate(ctx.counts) if n == 0]
        for grad in grads:
            for e in idle if grad is not None else ():
                grad[e].zero_()  # a memset; `grad[idle] = 0` is an element-wise index_put
        per_expert = 1 + (first_a is not None) + (down_a is not None)
        for i, (e, rows) in enumerate(_expert_rows(ctx.counts)):
            gate_up, *low = kept[i * per_expert:(i + 1) * per_expert]
            x_a = low.pop(0) if first_a is not None else None
            g_a = low.pop(0) if down_a is not None else None
            go, weight, tokens = grad_out[rows], slot_weight[rows, None], slot_token[rows]
            with torch.enable_grad():
                gate_up = gate_up.detach().requires_grad_()
                gated = ctx.activate(gate_up)
            grad_gated = go @ down[e]  # gradient of the unweighted output's input
            go_b = None
            if down_a is not None:  # through the low-rank path: s (g A^T) B^T
                go_b = go @ down_b[e]
                grad_gated.addmm_(go_b, down_a[e], alpha=down_scale)
            if need[1]:  # d(w * (gated @ Wd^T + b))/dw . g = gated . (g @ Wd) + b . g
                grad_weight[rows] = (grad_gated * gated.detach()).sum(-1)
                if down_bias is not None:
                    grad_weight[rows] += go @ down_bias[e]
            go_w = go * weight
            if need[3]:
                torch.mm(go_w.t(), gated.detach(), out=grad_down[e])
            if need[5]:
                grad_down_bias[e] = go_w.sum(0)
            if need[9]:
                torch.mm(go_w.t(), g_a, out=grad_down_b[e]).mul_(down_scale)
            if need[8]:
                torch.mm((go_b * weight).t(), gated.detach(), out=grad_down_a[e]) \
                    .mul_(down_scale)
            if any(need[i] for i in (0, 2, 4, 6, 7)):
                (grad_pre,) = torch.autograd.grad(gated, gate_up, grad_gated * weight)
                x = hidden[tokens] if need[2] or need[6] else None
                pre_b = grad_pre @ first_b[e] if first_a is not None else None
                if need[2]:
                    torch.mm(grad_pre.t(), x, out=grad_first[e])
                if need[4]:
                    grad_first_bias[e] = grad_pre.sum(0)
                if need[7]:
                    torch.mm(grad_pre.t(), x_a, out=grad_first_b[e]).mul_(first_scale)
                if need[6]:
                    torch.mm(pre_b.t(), x, out=grad_first_a[e]).mul_(first_scale)
                if need[0]:
                    grad_x = grad_pre @ first[e]
                    if pre_b is not None:
                        grad_x.addmm_(pre_b, first_a[e], alpha=first_scale)
                    grad_hidden.index_add_(0, tokens, grad_x)
        return (grad_hidden, grad_weight, grad_first, grad_down, grad_first_bias,
                grad_down_bias, grad_first_a, grad_first_b, grad_down_a, grad_down_b,
                None, None, None, None)


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
    factors, scales = [], []
    for lora in (w.first_lora, w.down_lora):
        factors += [lora.a, lora.b] if lora is not None else [None, None]
        scales.append(lora.scale if lora is not None else 0.0)
    return RoutedExpertMLP.apply(hidden, slot_weight, w.first, w.down, w.first_bias,
                                 w.down_bias, *factors, slot_token, counts, w.activate,
                                 tuple(scales))
