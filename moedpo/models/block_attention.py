"""Attention over shared-prompt and packed rows that runs only the blocks the mask allows.

A shared-prompt row (data.share_prompt) holds per pair `prompt[:-1] | chosen | rejected`, and
a packed row (data.packing) several such blocks. Under a dense 4-D mask every query is scored
against every key of the row, although a pair only needs two causal products: `prompt +
chosen` against itself, and `rejected` against `prompt + rejected`. With long prompts the
dense product does about twice that work (measured: 28% of a long-prompt step on the CPU),
and with packing it grows with the square of the packed row's length, which is why packing
lost on long rows.

`block_attention_forward` is SDPA run per pair on exactly those two products (fused causal
kernels, flash on CUDA and CPU), registered with transformers as the attention implementation
`moedpo_sdpa`. It reads the layout from the `moedpo_blocks` keyword that `batch_logps`
passes through the model's forward (transformers hands extra keywords to the attention
function), so recomputation under activation checkpointing sees it too. Without that keyword
(plain rows, generation, a model's own use) it is transformers' SDPA, unchanged.

Why not FlexAttention block masks: its fast path needs torch.compile of the attention, with a
recompile (or dynamic shapes) per row length, and its eager path materialises all scores;
per-pair SDPA skips the same blocks with the kernels every backend already has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..private_api import attention_implementation

NAME = "moedpo_sdpa"
KEYWORD = "moedpo_blocks"
# (row, start, prompt tokens, chosen segment tokens, rejected segment tokens) of one pair.
Block = tuple[int, int, int, int, int]


def _pair(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block: Block,
          scale: float | None, dropout: float) -> list[torch.Tensor]:
    """[H, T, D] of one row -> the outputs of one pair's tokens, [H, n, D] pieces in order."""
    _, start, n_prompt, n_chosen, n_rejected = block
    mid, end = start + n_prompt + n_chosen, start + n_prompt + n_chosen + n_rejected
    first = F.scaled_dot_product_attention(
        query[None, :, start:mid], key[None, :, start:mid], value[None, :, start:mid],
        dropout_p=dropout, is_causal=True, scale=scale)[0]
    keys = torch.cat([key[:, start:start + n_prompt], key[:, mid:end]], dim=1)
    values = torch.cat([value[:, start:start + n_prompt], value[:, mid:end]], dim=1)
    # rejected token i sees the whole prompt and rejected tokens 0..i (causal, lower right)
    allowed = torch.ones(n_rejected, n_prompt + n_rejected, dtype=torch.bool,
                         device=query.device).tril(n_prompt)
    second = F.scaled_dot_product_attention(
        query[None, :, mid:end], keys[None], values[None], attn_mask=allowed,
        dropout_p=dropout, scale=scale)[0]
    return [first, second]


# Not traced under model.compile: dynamo would specialise on every layout's ints and recompile
# each batch; as a graph break the compiled layers around it settle on dynamic shapes.
@torch.compiler.disable
def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    blocks: Sequence[Block], scale: float | None = None,
                    dropout: float = 0.0) -> torch.Tensor:
    """[B, H, T, D] queries and keys/values (as many heads) -> [B, H, T, D], each pair's
    tokens attending as the shared-prompt mask allows; padding positions give zeros."""
    rows, heads, length, width = query.shape
    by_row: list[list[Block]] = [[] for _ in range(rows)]
    for block in blocks:
        by_row[block[0]].append(block)
    out = []
    for row, members in enumerate(by_row):
        pieces, used = [], 0
        for block in sorted(members, key=lambda b: b[1]):
            if block[1] != used:
                raise ValueError(f"moedpo_blocks: row {row} has a gap before token {block[1]}")
            pieces += _pair(query[row], key[row], value[row], block, scale, dropout)
            used = block[1] + sum(block[2:])
        if used < length:
            pieces.append(query.new_zeros(heads, length - used, width))
        out.append(torch.cat(pieces, dim=1))
    return torch.stack(out)


def block_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: [B, T, H, D] output, no weights."""
    blocks = kwargs.pop(KEYWORD, None)
    if blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    # Terms SDPA would add to the scores (attention sinks, soft-capping, position biases):
    # the per-pair products know none of them, so refuse rather than drop one silently.
    extra = [k for k in ("s_aux", "softcap", "position_bias") if kwargs.get(k) is not None]
    if extra:
        raise ValueError(f"{NAME}: {type(module).__name__} passes {', '.join(extra)} to its "
                         "attention, which the per-pair path does not apply; set "
                         "model.attn_implementation=eager")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = block_attention(query, key, value, blocks, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def placeholder_mask(rows: int, length: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """What the model gets as its attention mask while `moedpo_blocks` carries the layout: a
    4-D mask (transformers takes it as given, builds none) of no storage."""
    return torch.zeros((), dtype=dtype, device=device).expand(rows, 1, length, length)


def uses_blocks(model: torch.nn.Module) -> bool:
    return attention_implementation(model) == NAME


AttentionInterface.register(NAME, block_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
