"""The DPO loss of one collated batch (with the policy's router losses for MoE models), and
the evaluation pass."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

import torch

from .config import ConfigError, DPOConfig
from .data.collate import SEGMENT_CHOSEN, SEGMENT_PROMPT, SEGMENT_REJECTED
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
from .metrics import MeanMetrics
from .models import block_attention, chunked_head
from .models.drift import routing_drift
from .models.families import takes_mask_per_layer_type
from .models.moe import moe_top_k
from .models.router import RouterRecord, record_router_logits, router_losses


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


def attention_blocks(model: torch.nn.Module,
                     batch: dict[str, torch.Tensor]) -> tuple | None:
    """The pairs' layout for models.block_attention, as Python ints; None where the dense
    mask is needed: another attention implementation, no `blocks` in the batch, or a sliding
    window shorter than a sequence of the batch (the blocks know no window)."""
    if not block_attention.uses_blocks(model) or "blocks" not in batch:
        return None
    blocks = tuple(tuple(b) for b in batch["blocks"].tolist())  # a host tensor: no sync
    window, _ = sliding_window(model.config)
    longest = max((b[2] + max(b[3], b[4]) for b in blocks), default=0)
    return blocks if window is None or longest <= window else None


def shared_prompt_mask(segments: torch.Tensor, dtype: torch.dtype,
                       positions: torch.Tensor | None = None,
                       window: int | None = None,
                       pair_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, T] segments -> [rows, 1, T, T] additive attention mask: causal, and a position
    sees its own pair's prompt and its own segment only (a response never sees the other one
    nor, in packed rows (`pair_ids`), another pair; padding sees itself, so no row of the
    softmax is empty). Transformers takes a 4-D mask as given. With a sliding `window`, a
    query also sees only keys whose position (`positions`, the unshared sequence's) is less
    than `window` before its own, as transformers' sliding mask does."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((key == SEGMENT_PROMPT) | (key == query))
    if pair_ids is not None:
        allowed &= pair_ids[:, :, None] == pair_ids[:, None, :]
    if window is not None:
        allowed &= (positions[:, :, None] - positions[:, None, :]) < window
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def sliding_window(config) -> tuple[int | None, bool]:
    """(window, mixed): the sliding window of a model's attention layers (None: none), and
    whether only some layers use it (`layer_types`, as Gemma 2/3, Qwen2 and gpt-oss have)."""
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or [])
    if not window or (types and "sliding_attention" not in types):
        return None, False
    return window, bool(types - {"sliding_attention"})


def share_prompt_blocker(cfg: DPOConfig, static_shapes: bool,
                         model: torch.nn.Module) -> str | None:
    """Why one row per pair (shared prompt) would not give the same result here; None when
    it does."""
    m = cfg.model
    if static_shapes and str(cfg.data.packing).lower() != "true":
        return ("static shapes (rows padded to a fixed length; data.packing=true bin-packs "
                "shared rows into them)")
    if m.capacity_factor > 0 or m.moe_implementation == "dropped":
        return "the dropped MoE (its capacity is per sequence)"
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention not in ("sdpa", "eager", block_attention.NAME):
        return f"attn_implementation={attention}, which takes no 4-D attention mask"
    _, mixed = sliding_window(model.config)
    if mixed and not takes_mask_per_layer_type(model):
        return (f"{type(model).__name__} mixes sliding and full attention layers and takes no "
                "mask per layer type")
    return None


def use_shared_prompt(cfg: DPOConfig, static_shapes: bool, model: torch.nn.Module) -> bool:
    """data.share_prompt resolved for this run: auto is on wherever it is exact."""
    setting = str(cfg.data.share_prompt).lower()
    if setting == "false":
        return False
    why = share_prompt_blocker(cfg, static_shapes, model)
    if why is None:
        return True
    if setting == "true":
        raise ConfigError(f"data.share_prompt=true is not exact with {why}; set "
                          "data.share_prompt=auto or false")
    logging.getLogger("moedpo").info("shared prompt off (data.share_prompt=auto): %s", why)
    return False


def packing_budget(cfg: DPOConfig, shared: bool, model: torch.nn.Module,
                   static: bool = False) -> int:
    """data.packing resolved for this run: the most tokens a row takes (0: one pair per row).
    auto packs wherever attention runs per pair (models.block_attention), where a row's
    length costs nothing: the whole micro-batch then goes in one row unless
    data.max_tokens_per_row says otherwise. Under a dense mask a packed row costs attention
    over all of it (it lost on long prompts), so auto leaves packing off there. With `static`
    shapes (only data.packing=true gets here) rows are exactly the budget long: bin packing
    into fixed rows, data.max_tokens_per_row or 2 x max_length (a pair's block fits)."""
    setting, d = str(cfg.data.packing).lower(), cfg.data
    if setting == "false":
        return 0
    if not shared:
        if setting == "true":
            raise ConfigError("data.packing=true packs shared-prompt rows, which are off for "
                              "this run (see the line above, or data.share_prompt=false); set "
                              "data.packing=false")
        return 0
    if static:
        return d.max_tokens_per_row or 2 * cfg.max_length
    window, _ = sliding_window(model.config)
    per_pair = block_attention.uses_blocks(model) and (window is None or window >= cfg.max_length)
    if setting == "auto" and not per_pair:
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        why = (f"attn_implementation={attention}" if not block_attention.uses_blocks(model)
               else f"a sliding window of {window} < max_length")
        logging.getLogger("moedpo").info("packing off (data.packing=auto): %s computes a "
                                         "dense mask over a whole packed row", why)
        return 0
    if d.max_tokens_per_row:
        return d.max_tokens_per_row
    return sys.maxsize if per_pair else 2 * cfg.max_length


def shared_prompt_attention(model: torch.nn.Module, segments: torch.Tensor,
                            positions: torch.Tensor, dtype: torch.dtype,
                            pair_ids: torch.Tensor | None = None):
    """The shared-prompt mask as the model takes it: one 4-D mask, windowed where every layer
    slides (Mistral), or for models whose layers mix full and sliding attention the mapping
    of both by layer type that their forward accepts in place of a mask."""
    window, mixed = sliding_window(model.config)
    full = shared_prompt_mask(segments, dtype, pair_ids=pair_ids)
    if window is None:
        return full
    windowed = shared_prompt_mask(segments, dtype, positions, window, pair_ids)
    if not mixed:
        return windowed
    if not takes_mask_per_layer_type(model):
        raise ConfigError(f"data.share_prompt=true: {type(model).__name__} mixes sliding and "
                          "full attention layers and takes no mask per layer type; set "
                          "data.share_prompt=false")
    return {"full_attention": full, "sliding_attention": windowed}


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
    return LossOptions(cfg.beta, c.label_smoothing, c.simpo_gamma, c.cpo_alpha,
                       c.alphapo_alpha, c.dpop_lambda, c.rdpo_alpha, c.discopop_tau,
                       c.use_weighting, c.kto_desirable_weight, c.kto_undesirable_weight)


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


@torch.no_grad()
def evaluate(policy: torch.nn.Module, reference: torch.nn.Module | None, batches,
             cfg: DPOConfig, sync: Callable[[], None] = lambda: None,
             groups: list[str] | None = None, shift: RewardShift | None = None,
             sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
             ) -> MeanMetrics:
    """Metrics over this rank's eval pairs; `batches` yields (collated batch, valid, labels):
    only the first `valid` pairs of a batch count (the rest pad ranks to equal work); with
    `groups` (several data sources), per-pair metrics are also kept by each pair's label.
    `sync` runs the batch's graph on XLA before its metrics are read."""
    was_training = policy.training
    policy.eval()
    metrics = MeanMetrics()
    for batch, valid, labels in batches:
        out = batch_loss(policy, reference, batch, cfg, shift, sum_over_ranks, valid)
        sync()
        if groups:
            metrics.add_grouped({k: v[:valid] for k, v in out.metrics.items()},
                                labels[:valid], groups)
        if valid:
            out.metrics = {k: v[:valid] for k, v in out.metrics.items()}
            metrics.add_output(out)
    policy.train(was_training)
    return metrics


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: list[list[int]],
             max_new_tokens: int) -> list[str]:
    """Greedy continuations, one prompt at a time (a handful of prompts: no padding needed).
    No KV cache: every forward sees the whole sequence, so the dropped MoE's per-sequence
    capacity means what it means in training rather than collapsing on one-token steps."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts = []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    for ids in prompts:  # an empty prompt starts from BOS (or EOS): generate needs a token
        input_ids = torch.tensor([list(ids) or [start]], dtype=torch.long, device=device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, input_ids.shape[1]:],
                                      skip_special_tokens=True).strip())
    model.train(was_training)
    return texts
