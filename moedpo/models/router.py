"""Router losses and statistics from the routers' logits.

Everything here reads the per-layer router logits `[B*S, E]`, recorded from the model's
router modules during its forward (`record_router_logits`), plus a [B, S] mask of real tokens,
so it serves every MoE implementation alike. Padding tokens never count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..private_api import router_logits_source
from .drift import RoutingDrift
from .families import router_score
from .moe import capacity, kept_slots


@dataclass
class RouterRecord:
    """One forward's routers, in layer order: their logits, and the top-k experts each
    token went to as the router chose them (its own rule: softmax top-k, or sigmoid scores
    plus a correction bias within the best groups as DeepSeek-V3 and GLM-4-MoE do); None
    for a router that does not return its choice."""

    logits: list[torch.Tensor] = field(default_factory=list)
    choices: list[torch.Tensor | None] = field(default_factory=list)
    # each router's score function (families.ROUTER_SCORES)
    scores: list[str] = field(default_factory=list)


@contextlib.contextmanager
def record_router_logits(model: torch.nn.Module) -> Iterator[RouterRecord]:
    """Collect each router's logits and choices during a forward, in layer order. The same
    modules transformers records for `output_router_logits=True` (its
    `_can_record_outputs`), but without also running its load-balancing loss, which moedpo
    computes itself and which cannot read the 4-D attention mask of shared-prompt batches."""
    sink = _router_sink(model)
    record = RouterRecord()
    sink["record"] = record
    try:
        yield record
    finally:  # closed before backward: activation checkpointing re-runs the forward
        sink["record"] = None


def _chosen_experts(output) -> torch.Tensor | None:
    """transformers' routers return (logits, top-k weights, top-k indices)."""
    if isinstance(output, tuple) and len(output) >= 3 and torch.is_tensor(output[2]) \
            and not output[2].is_floating_point():
        return output[2]
    return None


def _router_sink(model: torch.nn.Module) -> dict:
    """Forward hooks on the router modules, registered once per model, appending to
    `sink["record"]` while a recording is open. Registered once (not per forward) and run
    outside torch.compile's graphs, so compiled layers see the same hooks on every call and
    are not recompiled."""
    if hasattr(model, "_moedpo_router_sink"):
        return model._moedpo_router_sink
    sink: dict = {"record": None}
    model._moedpo_router_sink = sink
    source = router_logits_source(model)
    if source is None:
        return sink
    index = source[1]

    @torch.compiler.disable
    def keep(module, _inputs, output) -> None:
        # The sink is read from the module, so a deep copy of the model records into its own.
        record = module._moedpo_router_sink["record"]
        if record is not None:
            record.logits.append(output[index] if isinstance(output, tuple) else output)
            record.choices.append(_chosen_experts(output))
            record.scores.append(module._moedpo_router_score)

    score = router_score(model)
    for module in router_modules(model):
        module._moedpo_router_sink = sink
        module._moedpo_router_score = score
        module.register_forward_hook(keep)
    return sink


def router_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's router (gate) modules: the class transformers records router logits from
    (`_can_record_outputs["router_logits"]`); none for a dense model."""
    source = router_logits_source(model)
    if source is None:
        return []
    return [m for m in model.modules() if isinstance(m, source[0])]


def freeze_routers(model: torch.nn.Module) -> int:
    """model.freeze_router: router weights and biases take no gradient (and so get no
    optimizer state); returns how many parameters were frozen."""
    params = [p for m in router_modules(model) for p in m.parameters()]
    for param in params:
        param.requires_grad_(False)
    return len(params)


@dataclass
class RouterOutput:
    aux_loss: torch.Tensor  # differentiable, mean over layers
    z_loss: torch.Tensor  # differentiable, mean over layers
    # Counts stay tensors (read by the caller once the step has run: no host sync here).
    expert_counts: torch.Tensor  # [L, E] (token, rank) assignments of real tokens, detached
    dropped_slots: torch.Tensor  # (token, rank) slots of real tokens that lost their expert
    fully_dropped_tokens: torch.Tensor  # real tokens that lost every slot
    real_tokens: torch.Tensor
    top_k: int
    drift: RoutingDrift | None = None  # against the reference's routers (models/drift.py)


def router_losses(router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor,
                  top_k: int, capacity_factor: float = 0.0, rounding: str = "floor",
                  ignore_padding: bool = True,
                  choices: Sequence[torch.Tensor | None] | None = None,
                  token_weights: torch.Tensor | None = None,
                  sequences: torch.Tensor | None = None,
                  pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  scores: Sequence[str] | None = None) -> RouterOutput:
    """Switch/Mixtral load-balancing loss per layer, `E * sum_e f_e * P_e` with f_e the share
    of top-k assignments to expert e (summing to k, as Hugging Face normalises it) and P_e the
    mean router probability (the router's own scores, `scores` per layer: the softmax of the
    logits, or for sigmoid routers their sigmoid normalised over experts, as DeepSeek-V3's
    balance loss takes them), averaged over layers (HF pools the
    layers' counts instead; with one layer the two agree). z-loss: mean squared logsumexp of
    the router logits (ST-MoE). Assignments, counts and drops are the router's own `choices`
    (its top-k indices) where given, else the softmax top-k of the logits. `token_weights`
    ([batch, seq], default the attention mask) counts a token that many times: a shared
    prompt's tokens twice, as the two rows of the unshared layout hold them.

    model.router_aux_loss_scope: with `sequences` ([S, batch*seq]: each sequence's tokens)
    f and P are taken within each sequence and the loss averaged over them (DeepSeek-V3's
    sequence-wise balance loss); with `pool` f (and the token count) are the global
    batch's, as Qwen balances: `pool` maps this part's flat statistics (`flat_statistics`)
    to the sums over every part of the batch (every rank's share of the micro-batch, and
    with gradient accumulation every micro-batch: `global_routing`), each part's gradient
    being its tokens' share of that one loss."""
    batch, seq_len = attention_mask.shape
    mask = attention_mask.reshape(-1).bool()
    weight = (token_weights.reshape(-1).float() if token_weights is not None
              else mask.float())
    n_real = weight.sum().clamp(min=1)
    z, counts, prob_sums, tops = [], [], [], []
    dropped = fully = torch.zeros((), device=attention_mask.device)
    choices = choices or [None] * len(router_logits)
    scores = scores or ["softmax"] * len(router_logits)
    for logits, chosen, score in zip(router_logits, choices, scores, strict=True):
        logits = logits.float()
        if score == "sigmoid":
            probs = logits.sigmoid()
            probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-20)
        else:
            probs = logits.softmax(-1)
        num_experts = probs.shape[-1]
        top = chosen.long() if chosen is not None else probs.topk(top_k, dim=-1).indices
        assigned = torch.zeros(num_experts, device=logits.device).index_add_(
            0, top.reshape(-1), weight.repeat_interleave(top_k))
        prob_sums.append((probs * weight[:, None]).sum(0))
        tops.append((top, probs))
        z.append((logits.logsumexp(-1).pow(2) * weight).sum() / n_real)
        counts.append(assigned.detach())
        if capacity_factor > 0:
            with torch.no_grad():
                slots = capacity(seq_len, top_k, num_experts, capacity_factor, rounding)
                token_mask = attention_mask.bool() if ignore_padding else None
                kept = kept_slots(top.view(batch, seq_len, top_k), num_experts, slots,
                                  token_mask).view(-1, top_k)
                dropped = dropped + (~kept & mask[:, None]).sum()
                fully = fully + (~kept.any(-1) & mask).sum()
    counts_t, probs_t = torch.stack(counts), torch.stack(prob_sums)  # [L, E]
    if sequences is not None:
        aux = torch.stack([_sequence_aux(top, probs, sequences) for top, probs in tops])
    elif pool is not None:
        aux = _global_aux(counts_t, probs_t, n_real, pool)
    else:
        aux = probs_t.shape[-1] * ((counts_t / n_real) * (probs_t / n_real)).sum(-1)
    layers = len(router_logits)
    return RouterOutput(aux.mean(), torch.stack(z).mean(), counts_t,
                        dropped / layers, fully / layers, n_real.float(), top_k)


def _sequence_aux(top: torch.Tensor, probs: torch.Tensor,
                  sequences: torch.Tensor) -> torch.Tensor:
    """One layer's loss within each sequence, averaged over sequences."""
    num_experts = probs.shape[-1]
    chosen = torch.zeros_like(probs).scatter_add_(
        1, top, torch.ones(top.shape, dtype=probs.dtype, device=probs.device)).detach()
    members = sequences.to(probs.dtype)
    n = members.sum(-1, keepdim=True).clamp(min=1)
    share, mean_prob = (members @ chosen) / n, (members @ probs) / n
    per_sequence = num_experts * (share * mean_prob).sum(-1)
    return per_sequence[members.sum(-1) > 0].mean()


def flat_statistics(counts: torch.Tensor, prob_sums: torch.Tensor,
                    n_real: torch.Tensor) -> torch.Tensor:
    """One part of a batch's router statistics as one flat tensor, so that summing it over
    ranks (and micro-batches) is one all-reduce: [L*E] expert assignments, [L*E] router
    probability sums, the token count, and a 1 that sums to the number of parts."""
    return torch.cat([counts.reshape(-1), prob_sums.detach().reshape(-1), n_real.reshape(1),
                      torch.ones(1, device=counts.device)])


def _global_aux(counts: torch.Tensor, prob_sums: torch.Tensor, n_real: torch.Tensor,
                pool: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[L] losses over the global batch. The value is the pooled loss itself; the gradient
    is this part's tokens' share of it, times the number of parts, since the ranks'
    gradients are averaged and accumulation divides each micro-batch's loss by their number
    (so the mean over parts is the pooled loss's gradient)."""
    layers, num_experts = counts.shape
    total = pool(flat_statistics(counts, prob_sums, n_real))
    size = layers * num_experts
    counts_g = total[:size].view(layers, num_experts)
    probs_g = total[size:2 * size].view(layers, num_experts)
    n_g, parts = total[2 * size].clamp(min=1), total[2 * size + 1]
    share = counts_g / n_g
    mine = num_experts * (share * prob_sums / n_g).sum(-1) * parts
    pooled = num_experts * (share * probs_g / n_g).sum(-1)
    return mine - mine.detach() + pooled
