"""One training step, top to bottom: `optimizer_step` runs a step's micro-batches (each
`batch_loss`: the reference's log-probs or the precomputed ones, the policy's, the configured
preference losses, and for MoE models the router losses and routing drift), backpropagates
each scaled by its share of the step's pairs, clips, and steps the optimizer where the step is
finite. Evaluation averages the same `batch_loss`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import DPOConfig
from .data.collate import SEGMENT_CHOSEN, SEGMENT_PROMPT, SEGMENT_REJECTED
from .layout import attention_blocks, shared_prompt_attention
from .logps import SequenceLogps, sequence_logps, sequence_logps_from_tokens
from .losses import (
    DPOOutput,
    LossOptions,
    loss_names,
    pair_logps,
    preference_loss,
    unpaired_losses,
)
from .losses.unpaired import RewardShift, global_kl_estimate
from .models import block_attention, chunked_head
from .models.balance import update_correction_biases
from .models.drift import routing_drift
from .models.moe import moe_top_k
from .models.router import RouterRecord, record_router_logits, router_losses
from .optim import clip_grad_norm, step_if_finite
from .parallel import Strategy


@dataclass
class StepOutcome:
    loss: float  # the step's loss: the mean over all ranks' pairs
    grad_norm: float  # the global norm before clipping
    outputs: list[DPOOutput]  # this rank's micro-batches
    applied: bool  # loss and norm finite: the optimizer stepped


def optimizer_step(policy: torch.nn.Module, reference: torch.nn.Module | None,
                   batches: list[dict[str, torch.Tensor]], weights: list[float],
                   cfg: DPOConfig, optimizer: torch.optim.Optimizer,
                   params: list[torch.nn.Parameter], parallel: Strategy,
                   shift: RewardShift | None = None,
                   computing: Callable[[], contextlib.AbstractContextManager] =
                   contextlib.nullcontext, pooled_routing: bool = False) -> StepOutcome:
    """One optimizer step over this rank's micro-batches (`weights`: each one's share of the
    step's pairs, so the gradient is the step's mean). A non-finite loss or norm skips the
    update (decided on the device on XLA, without a host read inside the step's graph);
    `computing` is the precision context (a bf16 compute copy of float32 masters)."""
    backend = parallel.backend
    outputs, norm = backward_pass(policy, reference, batches, weights, cfg, optimizer, params,
                                  parallel, shift, computing, pooled_routing)
    losses = torch.stack([out.loss.detach() for out in outputs]).sum()
    if cfg.model.router_bias_update_rate > 0:  # aux-loss-free balancing
        counts = torch.stack([out.router.expert_counts for out in outputs]).sum(0)
        update_correction_biases(policy, backend.sum_over_ranks(counts),
                                 cfg.model.router_bias_update_rate)
    if backend.kind == "xla":  # decided on the device: no host read inside the step
        step_if_finite(optimizer, torch.isfinite(losses) & torch.isfinite(norm))
        backend.sync()  # runs the step's one graph; the reads below only copy
    step_loss = float(backend.all_reduce_sum(losses.reshape(1).cpu().double())[0])
    grad_norm = float(norm)
    applied = math.isfinite(step_loss) and math.isfinite(grad_norm)
    if applied and backend.kind != "xla":
        optimizer.step()
    return StepOutcome(step_loss, grad_norm, outputs, applied)


def backward_pass(policy: torch.nn.Module, reference: torch.nn.Module | None,
                  batches: list[dict[str, torch.Tensor]], weights: list[float],
                  cfg: DPOConfig, optimizer: torch.optim.Optimizer,
                  params: list[torch.nn.Parameter], parallel: Strategy,
                  shift: RewardShift | None = None,
                  computing: Callable[[], contextlib.AbstractContextManager] =
                  contextlib.nullcontext, pooled_routing: bool = False
                  ) -> tuple[list[DPOOutput], torch.Tensor]:
    """A step up to the update: every micro-batch's forward and backward, the gradients
    reduced by the strategy and clipped; (outputs, the global norm before clipping). Reads
    nothing on the host, so the planner traces it on fake tensors (planner/trace.py)."""
    backend = parallel.backend
    optimizer.zero_grad(set_to_none=True)
    totals = None
    if pooled_routing:  # the step's expert loads, before the first backward
        with computing():
            totals = global_routing(policy, batches, cfg, backend.sum_over_ranks)
    outputs = []
    for batch, weight in zip(batches, weights, strict=True):
        with computing():
            out = batch_loss(policy, reference, batch, cfg, shift, backend.sum_over_ranks,
                             router_totals=totals)
            (out.loss * weight).backward()
        outputs.append(out)
    parallel.reduce_gradients(policy)
    clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    return outputs, clip_grad_norm(params, clip)  # global norm


def batch_loss(policy: torch.nn.Module, reference: torch.nn.Module | None,
               batch: dict[str, torch.Tensor], cfg: DPOConfig,
               shift: RewardShift | None = None,
               sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
               rows: int | None = None,
               router_totals: torch.Tensor | None = None) -> DPOOutput:
    """The step's loss on one micro-batch. KTO's z0 and the global_batch router loss are
    taken over every rank's share of the micro-batch (`sum_over_ranks`); of z0's rows only
    the first `rows` count (eval pads a rank's last batch). With gradient accumulation the
    global_batch router loss takes the whole step's statistics, `router_totals`
    (`global_routing`)."""
    # The reference runs first: its forward's temporaries are gone before the policy's
    # activations, kept for the backward, are made.
    reference_logps = reference_routers = None
    top_k = moe_top_k(policy)
    if reference is not None and "reference_logps" not in batch:
        with torch.no_grad():
            reference_logps, reference_routers = batch_logps(
                reference, batch, cfg.label_pad_token_id, with_router=top_k is not None)
    policy_logps, routers = batch_logps(policy, batch, cfg.label_pad_token_id,
                                        with_router=top_k is not None,
                                        wpo=cfg.loss.use_weighting)
    if "reference_logps" in batch:  # precomputed (reference.precompute=true)
        reference_logps = SequenceLogps(batch["reference_logps"], policy_logps.n_tokens,
                                        torch.zeros_like(batch["reference_logps"]))
    options, names = loss_options(cfg), loss_terms(cfg)
    if unpaired_losses(names[0]):
        view = pair_logps(policy_logps, reference_logps)
        options.kto_kl = global_kl_estimate(view, sum_over_ranks, rows)
        if shift is not None:  # BCO: training batches move the reward shift, eval reads it
            rewards = cfg.beta * view.chosen_logratios
            options.bco_delta = shift.update(rewards) if policy.training else shift.mean
    out = preference_loss(policy_logps, reference_logps, *names, options,
                          cfg.loss.f_divergence, cfg.loss.f_alpha, batch.get("kto_labels"))
    if routers is not None and routers.logits:
        m = cfg.model
        token_weights = router_token_weights(batch)
        scope = m.router_aux_loss_scope
        pool = ((lambda _part: router_totals) if router_totals is not None
                else sum_over_ranks if scope == "global_batch" else None)
        out.router = router_losses(routers.logits, batch["attention_mask"], top_k,
                                   m.capacity_factor, m.capacity_rounding, m.moe_ignore_padding,
                                   routers.choices, token_weights,
                                   router_sequences(batch) if scope == "sequence" else None,
                                   pool, routers.scores)
        if reference_routers is not None and reference_routers.logits:
            weight = (token_weights if token_weights is not None else batch["attention_mask"])
            out.router.drift = routing_drift(routers.logits, reference_routers.logits,
                                             routers.choices, reference_routers.choices,
                                             weight.reshape(-1).float(), top_k)
        out.loss = (out.loss + m.router_aux_loss_coef * out.router.aux_loss
                    + m.router_z_loss_coef * out.router.z_loss)
    return out


def batch_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], label_pad: int,
                with_router: bool = False, wpo: bool = False
                ) -> tuple[SequenceLogps, RouterRecord | None]:
    """One forward over chosen and rejected together; the routers' record when asked (MoE);
    WPO's weights with `wpo`. With a chunked head (model.logps_chunk_size) the model returns
    token log-probs, never the full logits."""
    extra, layout = {}, None
    if "segments" in batch:  # shared-prompt rows (data.share_prompt), packed or not
        layout = {k: batch[k] for k in ("segments", "pair_ids", "pair_rows")}
        extra["position_ids"] = batch["position_ids"]
        dtype = model.get_input_embeddings().weight.dtype
        blocks = attention_blocks(model, batch)
        if blocks is not None:  # only the blocks the mask allows are computed
            extra[block_attention.KEYWORD] = blocks
            attention_mask = block_attention.placeholder_mask(
                *batch["segments"].shape, dtype, batch["segments"].device)
        else:
            attention_mask = shared_prompt_attention(model, batch["segments"],
                                                     batch["position_ids"], dtype,
                                                     batch["pair_ids"])
    else:
        attention_mask = batch["attention_mask"]
    chunked = chunked_head.is_enabled(model)
    scope = (chunked_head.labels_for(model, batch["labels"], label_pad, sum_sq=wpo) if chunked
             else contextlib.nullcontext())
    routers = record_router_logits(model) if with_router else contextlib.nullcontext()
    with scope, routers as record:
        out = model(input_ids=batch["input_ids"], attention_mask=attention_mask,
                    use_cache=False, **extra)
    to_sums = sequence_logps_from_tokens if chunked else sequence_logps
    sums = to_sums(out.logits, batch["labels"], label_pad, layout, batch.get("token_weights"),
                   wpo=wpo)
    return sums, record if with_router else None


def loss_terms(cfg: DPOConfig) -> tuple[list[str], list[float]]:
    """(names, weights) of the configured losses; aux_nll_loss_coef > 0, the original's NLL
    term, is an `sft` term of that weight."""
    names = loss_names(cfg.loss.name)
    given = cfg.loss.weights
    weights = list(given) if given is not None else [1.0] * len(names)
    if cfg.aux_nll_loss_coef > 0:
        names, weights = [*names, "sft"], [*weights, cfg.aux_nll_loss_coef]
    return names, weights


def loss_options(cfg: DPOConfig) -> LossOptions:
    c = cfg.loss
    return LossOptions(beta=cfg.beta, label_smoothing=c.label_smoothing,
                       simpo_gamma=c.simpo_gamma, cpo_alpha=c.cpo_alpha,
                       alphapo_alpha=c.alphapo_alpha, dpop_lambda=c.dpop_lambda,
                       rdpo_alpha=c.rdpo_alpha, discopop_tau=c.discopop_tau,
                       use_weighting=c.use_weighting,
                       kto_desirable_weight=c.kto_desirable_weight,
                       kto_undesirable_weight=c.kto_undesirable_weight)


def router_token_weights(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """How many times each token counts in the router losses and statistics: a shared
    prompt's tokens (but the last, which each response segment repeats) twice, so the losses
    and expert loads equal the unshared layout's; None (the attention mask) otherwise."""
    segments = batch.get("segments")
    if segments is None:
        return None
    return batch["attention_mask"] * (1 + (segments == SEGMENT_PROMPT).long())


def router_sequences(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[sequences, rows*T] membership of each token in the unshared sequences (prompt +
    response) the batch holds: the rows themselves, or for shared-prompt (and packed) rows
    each pair's prompt with its chosen and, again, with its rejected segment, so a
    sequence-wise router loss is the same in either layout."""
    segments = batch.get("segments")
    if segments is None:
        mask = batch["attention_mask"].bool()
        rows, length = mask.shape
        members = torch.zeros(rows, rows, length, dtype=torch.bool, device=mask.device)
        members[torch.arange(rows), torch.arange(rows)] = mask
        return members.reshape(rows, -1)
    pair_ids, n_pairs = batch["pair_ids"].reshape(-1), batch["pair_rows"].shape[0]
    segments = segments.reshape(-1)
    pairs = pair_ids[None, :] == torch.arange(n_pairs, device=pair_ids.device)[:, None]
    prompt = segments == SEGMENT_PROMPT
    return torch.cat([pairs & (prompt | (segments == kind))[None]
                      for kind in (SEGMENT_CHOSEN, SEGMENT_REJECTED)])


def pools_accumulation(cfg: DPOConfig, policy: torch.nn.Module) -> bool:
    """Whether each step first counts the expert loads of all its micro-batches: the
    global_batch router loss of an MoE model under gradient accumulation."""
    m = cfg.model
    return (m.router_aux_loss_scope == "global_batch" and m.router_aux_loss_coef > 0
            and cfg.gradient_accumulation_steps > 1 and moe_top_k(policy) is not None)


@torch.no_grad()
def global_routing(policy: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                   cfg: DPOConfig,
                   sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The step's router statistics (`flat_statistics`) summed over its micro-batches and
    the ranks. Qwen's global-batch balance loss needs every micro-batch's expert counts
    before the first one's backward; keeping the graphs would hold every micro-batch's
    activations, so the policy runs once more without them (same weights, no dropout: the
    same routing as the forward that follows)."""
    m, top_k, parts = cfg.model, moe_top_k(policy), []
    for batch in batches:
        _, routers = batch_logps(policy, batch, cfg.label_pad_token_id, with_router=True)
        # router_losses takes the statistics exactly as the loss will; keep them.
        router_losses(routers.logits, batch["attention_mask"], top_k, 0.0, m.capacity_rounding,
                      m.moe_ignore_padding, routers.choices, router_token_weights(batch),
                      pool=lambda part: parts.append(part) or part, scores=routers.scores)
    return sum_over_ranks(torch.stack(parts).sum(0))
