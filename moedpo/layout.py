"""How a batch's pairs become rows and attention, decided once per run and applied per batch:
whether prompts are shared (one row per pair, the prompt once), whether rows are packed (and
how many tokens a row takes), and the attention each layout needs (per-pair blocks, a 4-D
mask, or a mask per layer type). Each decision is exact or off: where a layout would change
the numbers, `auto` leaves it off with one info line and `true` is a config error."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch

from .config import ConfigError, DPOConfig
from .data import collate, collate_shared
from .data.collate import HOST_KEYS, SEGMENT_PROMPT
from .models import block_attention
from .models.families import takes_mask_per_layer_type
from .parallel.backend import choose_kind
from .private_api import attention_implementation

if TYPE_CHECKING:
    from .parallel import Strategy
    from .parallel.backend import Backend


def share_prompt_blocker(cfg: DPOConfig, static_shapes: bool,
                         model: torch.nn.Module) -> str | None:
    """Why one row per pair (shared prompt) would not give the same result here; None when
    it does."""
    m = cfg.model
    if static_shapes and cfg.data.packing != "true":
        return ("static shapes (rows padded to a fixed length; data.packing=true bin-packs "
                "shared rows into them)")
    if m.capacity_factor > 0 or m.moe_implementation == "dropped":
        return "the dropped MoE (its capacity is per sequence)"
    attention = attention_implementation(model) or "eager"
    if attention not in ("sdpa", "eager", block_attention.NAME):
        return f"attn_implementation={attention}, which takes no 4-D attention mask"
    _, mixed = sliding_window(model.config)
    if mixed and not takes_mask_per_layer_type(model):
        return (f"{type(model).__name__} mixes sliding and full attention layers and takes no "
                "mask per layer type")
    return None


def use_shared_prompt(cfg: DPOConfig, static_shapes: bool, model: torch.nn.Module) -> bool:
    """data.share_prompt resolved for this run: auto is on wherever it is exact."""
    setting = cfg.data.share_prompt
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
    setting, d = cfg.data.packing, cfg.data
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
        attention = attention_implementation(model) or "eager"
        why = (f"attn_implementation={attention}" if not block_attention.uses_blocks(model)
               else f"a sliding window of {window} < max_length")
        logging.getLogger("moedpo").info("packing off (data.packing=auto): %s computes a "
                                         "dense mask over a whole packed row", why)
        return 0
    if d.max_tokens_per_row:
        return d.max_tokens_per_row
    return sys.maxsize if per_pair else 2 * cfg.max_length


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


def static_shapes(cfg: DPOConfig, backend_kind: str) -> bool:
    """data.static_shapes resolved: null is true on XLA (one compiled graph), false elsewhere."""
    static = cfg.data.static_shapes
    return static if static is not None else backend_kind == "xla"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_rows(cfg: DPOConfig) -> None:
    """The config rules of how pairs become rows and forwards (data.share_prompt,
    data.packing, data.tokens_per_batch, static shapes), checked before anything loads; the
    decisions that need the loaded model are the functions above."""
    m, d = cfg.model, cfg.data
    share, packing = d.share_prompt, d.packing
    _check(share != "true" or (m.capacity_factor == 0 and m.moe_implementation
                                         in ("auto", "dropless", "dense", "hf", "hf_eager")),
           "data.share_prompt=true puts both responses in one row, which changes what the "
           "dropped MoE's per-sequence capacity means; use a dropless MoE (capacity_factor=0) "
           "or data.share_prompt=false")
    buckets = d.length_buckets or []
    _check(all(isinstance(b, int) and 0 < b <= cfg.max_length for b in buckets),
           f"data.length_buckets={buckets}: each must be a whole number in 1..max_length "
           f"({cfg.max_length}), e.g. [128,256]")
    _check(packing != "true" or share != "false",
           "data.packing=true packs shared-prompt rows; set data.share_prompt=auto or true")
    static = static_shapes(cfg, choose_kind(cfg.parallel.backend))
    _check(d.tokens_per_batch is None or not static,
           "data.tokens_per_batch cuts steps into forwards of varying pair counts, one compiled "
           "graph each under static shapes; set data.static_shapes=false or "
           "data.tokens_per_batch=null")
    _check(d.tokens_per_batch is None or m.router_aux_loss_scope != "global_batch",
           "data.tokens_per_batch with model.router_aux_loss_scope=global_batch: the pooled "
           "loss splits its gradient evenly over a step's forwards, which token budgets make "
           "uneven; use router_aux_loss_scope=micro_batch or sequence, or "
           "data.tokens_per_batch=null")
    _check(d.max_tokens_per_row is None or d.max_tokens_per_row >= cfg.max_length,
           f"data.max_tokens_per_row={d.max_tokens_per_row}: must be >= max_length "
           f"({cfg.max_length}), or null (see data.max_tokens_per_row in docs/reference/config.md)")
    _check(not (share == "true" and d.static_shapes) or packing == "true",
           "data.share_prompt=true needs dynamic padding (rows are up to prompt + both "
           "responses long) or data.packing=true (bin packing into fixed rows); set "
           "data.static_shapes=false")
    _check(not (packing == "true" and static) or d.max_tokens_per_row is None
           or d.max_tokens_per_row >= 2 * cfg.max_length,
           f"data.max_tokens_per_row={d.max_tokens_per_row}: with static shapes every "
           f"row is that long and must hold any pair's block (up to 2 x max_length = "
           f"{2 * cfg.max_length} tokens); raise it or set it to null")


def padded_length(cfg: DPOConfig, backend: Backend) -> int | list[int] | None:
    """With static shapes (by default on XLA): max_length, or the length buckets up to it;
    else None: each batch's longest."""
    if not static_shapes(cfg, backend.kind):
        return None
    if cfg.data.length_buckets:
        return sorted({*cfg.data.length_buckets, cfg.max_length})
    return cfg.max_length


def batch_maker(cfg: DPOConfig, tokenizer, parallel: Strategy, shared: bool = False,
                max_tokens: int = 0) -> Callable:
    """pairs -> collated tensors on the backend's device, placed by the strategy (split over
    the mesh on XLA); one row per pair with `shared` (use_shared_prompt), several of up to
    `max_tokens` tokens with packing (packing_budget)."""
    backend = parallel.backend
    # pad_token_id null (or the original's -100, not a token) means the tokenizer's pad token.
    own_pad = cfg.pad_token_id is not None and cfg.pad_token_id >= 0
    pad_id = cfg.pad_token_id if own_pad else tokenizer.pad_token_id
    pad_to = padded_length(cfg, backend)
    if shared and pad_to is not None:  # static shapes: bin packing into rows of max_tokens
        pad_to = max_tokens
    to_rows = (partial(collate_shared, max_tokens=max_tokens, ld_alpha=cfg.loss.ld_alpha,
                       row_multiple=backend.devices if pad_to is not None else 1)
               if shared else partial(collate, ld_alpha=cfg.loss.ld_alpha))

    def make(pairs: list) -> dict[str, torch.Tensor]:
        batch = to_rows(pairs, pad_id, cfg.label_pad_token_id, pad_to)
        if backend.kind == "xla":  # eager attention: the dense mask, no per-pair layout
            batch.pop("blocks", None)
        batch = {k: v if k in HOST_KEYS else v.to(backend.device, non_blocking=True)
                 for k, v in batch.items()}
        return parallel.place(batch)
    return make
