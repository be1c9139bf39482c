"""Config checks of how pairs become rows and forwards (data.share_prompt, data.packing,
data.tokens_per_batch, static shapes): one-line ConfigErrors naming the key and the fix."""

from __future__ import annotations

from ..config import ConfigError, DPOConfig


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_rows(cfg: DPOConfig) -> None:
    m, d = cfg.model, cfg.data
    share = str(d.share_prompt).lower()
    _check(share in ("auto", "true", "false"),
           f"data.share_prompt={d.share_prompt}: use auto, true or false")
    _check(share != "true" or (m.capacity_factor == 0 and m.moe_implementation
                                         in ("auto", "dropless", "dense", "hf", "hf_eager")),
           "data.share_prompt=true puts both responses in one row, which changes what the "
           "dropped MoE's per-sequence capacity means; use a dropless MoE (capacity_factor=0) "
           "or data.share_prompt=false")
    _check(str(d.add_bos).lower() in ("auto", "true", "false"),
           f"data.add_bos={d.add_bos}: use auto, true or false")
    buckets = d.length_buckets or []
    _check(all(isinstance(b, int) and 0 < b <= cfg.max_length for b in buckets),
           f"data.length_buckets={buckets}: each must be a whole number in 1..max_length "
           f"({cfg.max_length}), e.g. [128,256]")
    packing = str(d.packing).lower()
    _check(packing in ("auto", "true", "false"),
           f"data.packing={d.packing}: use auto, true or false")
    _check(packing != "true" or share != "false",
           "data.packing=true packs shared-prompt rows; set data.share_prompt=auto or true")
    _check(d.tokens_per_batch is None or d.tokens_per_batch > 0,
           f"data.tokens_per_batch={d.tokens_per_batch}: must be > 0, or null (forwards "
           "of per_device_train_batch_size pairs)")
    static = d.static_shapes if d.static_shapes is not None else cfg.parallel.backend == "xla"
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
           f"({cfg.max_length}), or null (see README: data.max_tokens_per_row)")
    _check(not (share == "true" and d.static_shapes) or packing == "true",
           "data.share_prompt=true needs dynamic padding (rows are up to prompt + both "
           "responses long) or data.packing=true (bin packing into fixed rows); set "
           "data.static_shapes=false")
    _check(not (packing == "true" and static) or d.max_tokens_per_row is None
           or d.max_tokens_per_row >= 2 * cfg.max_length,
           f"data.max_tokens_per_row={d.max_tokens_per_row}: with static shapes every "
           f"row is that long and must hold any pair's block (up to 2 x max_length = "
           f"{2 * cfg.max_length} tokens); raise it or set it to null")
