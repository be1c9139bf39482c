"""Batches of preference pairs as model input.

`collate`: chosen rows, then rejected rows, right-padded with the tokenizer's pad id; labels
are the ids with prompt and padding positions set to `label_pad`. `pad_to=None` pads to the
batch's longest sequence, an int pads to exactly that length (static shapes for XLA). Pairs
carrying precomputed reference log-probs add `reference_logps` [2B], in the same row order.

`collate_shared` (data.share_prompt): one row per pair, the prompt once and both responses
after it, each response attending only to the prompt and itself (see `SEGMENT_*`).

With `ld_alpha` (LD-DPO, loss.ld_alpha) both add `token_weights`, aligned with `labels`: 1 on
a response's first min(|chosen|, |rejected|) tokens, ld_alpha on the rest of the longer one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tokenize import TokenizedPair

# Segment of each position in a shared-prompt row. The last prompt token predicts a
# response's first token, so each response segment starts with its own copy of it.
SEGMENT_PROMPT, SEGMENT_CHOSEN, SEGMENT_REJECTED, SEGMENT_PAD = 0, 1, 2, 3
# Batch entries read on the host (Python ints for slicing), never moved to the device.
HOST_KEYS = frozenset({"blocks"})


def _per_pair(pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    """Precomputed reference log-probs [2B] (chosen rows, then rejected), and unpaired rows'
    labels [B] (1.0 desirable) as `kto_labels`."""
    out = {}
    if all(p.reference is not None for p in pairs):
        out["reference_logps"] = torch.tensor([p.reference[0] for p in pairs]
                                              + [p.reference[1] for p in pairs])
    if all(p.label is not None for p in pairs):
        out["kto_labels"] = torch.tensor([float(p.label) for p in pairs])
    return out


PadTo = int | Sequence[int] | None


def ld_weights(n: int, shared: int, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's weights of a response's n tokens: 1 up to the pair's shorter length, then
    ld_alpha (arXiv 2409.06411: the verbose tail counts less)."""
    weights = torch.full((n,), float(ld_alpha))
    weights[:shared] = 1.0
    return weights


def _padded_length(longest: int, pad_to: PadTo) -> int:
    """None: the longest sequence; an int: exactly that; lengths: the shortest that fits."""
    if pad_to is None:
        return longest
    fitting = [n for n in ([pad_to] if isinstance(pad_to, int) else pad_to) if n >= longest]
    if not fitting:
        raise ValueError(f"a sequence of {longest} tokens does not fit pad_to={pad_to}")
    return min(fitting)


def collate(pairs: list[TokenizedPair], pad_id: int, label_pad: int = -100,
            pad_to: PadTo = None, ld_alpha: float | None = None) -> dict[str, torch.Tensor]:
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    length = _padded_length(max(len(prompt) + len(resp) for prompt, resp in sequences), pad_to)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), label_pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    weights = torch.zeros((len(sequences), length)) if ld_alpha is not None else None
    for row, (prompt, response) in enumerate(sequences):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response, dtype=torch.long)
        labels[row, n_prompt:n] = input_ids[row, n_prompt:n]
        attention_mask[row, :n] = 1
        if ld_alpha is not None:
            pair = pairs[row % len(pairs)]
            shared = min(len(pair.chosen), len(pair.rejected))
            weights[row, n_prompt:n] = ld_weights(len(response), shared, ld_alpha)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if ld_alpha is not None:
        batch["token_weights"] = weights
    return {**batch, **_per_pair(pairs)}


def _block(pair: TokenizedPair) -> list[tuple[int, list[int]]]:
    """A pair's shared-prompt block: (segment, tokens) of prompt[:-1], prompt[-1] chosen,
    prompt[-1] rejected."""
    shared, last = list(pair.prompt[:-1]), list(pair.prompt[-1:])
    return [(SEGMENT_PROMPT, shared), (SEGMENT_CHOSEN, last + list(pair.chosen)),
            (SEGMENT_REJECTED, last + list(pair.rejected))]


def pack_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into rows of at most `max_tokens` tokens, first-fit decreasing (a
    longer one gets a row of its own); `max_tokens` 0: one per row, in order."""
    if max_tokens <= 0:
        return [[i] for i in range(len(lengths))]
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([i])
            room.append(max_tokens - lengths[i])
        else:
            rows[row].append(i)
            room[row] -= lengths[i]
    return rows


def collate_shared(pairs: list[TokenizedPair], pad_id: int, label_pad: int = -100,
                   pad_to: PadTo = None, max_tokens: int = 0,
                   ld_alpha: float | None = None,
                   row_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Rows of shared-prompt blocks `prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected`,
    one pair per row, or with `max_tokens` (data.packing) as many as fit in that many tokens.
    Each token keeps the position id it has in its own unshared sequence; `segments` and
    `pair_ids` (the token's pair, -1 on padding) give the model's attention mask
    (layout.shared_prompt_mask: a token sees its own pair's prompt and its own segment)
    and the log-prob sums of each pair (`pair_rows`: [pairs], each pair's row). A response's
    first token is predicted from its own copy of the last prompt token, so every position
    predicts at most one label, and the log-probs equal the unshared ones. `blocks` [pairs, 5]
    (row, start, and the three segments' lengths of each pair) is the same layout for the
    attention (models.block_attention); it stays on the host (HOST_KEYS). `row_multiple`:
    rows of padding added until their number is a multiple of it (static shapes: rows are
    split over the devices, and each row count is one compiled graph)."""
    blocks = [_block(p) for p in pairs]
    layout = torch.zeros(len(pairs), 5, dtype=torch.long)
    rows = pack_rows([sum(len(t) for _, t in b) for b in blocks], max_tokens)
    length = _padded_length(max(sum(len(t) for i in row for _, t in blocks[i]) for row in rows),
                            pad_to)
    shape = (-(-len(rows) // row_multiple) * row_multiple, length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, label_pad, dtype=torch.long)
    segments = torch.full(shape, SEGMENT_PAD, dtype=torch.long)
    pair_ids = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    pair_rows = torch.zeros(len(pairs), dtype=torch.long)
    weights = torch.zeros(shape) if ld_alpha is not None else None  # only for LD-DPO
    for row, members in enumerate(rows):
        start = 0
        for i in members:
            pair_rows[i] = row
            n_shared = len(blocks[i][0][1])
            layout[i] = torch.tensor([row, start, *(len(t) for _, t in blocks[i])])
            shorter = min(len(pairs[i].chosen), len(pairs[i].rejected))
            for segment, tokens in blocks[i]:
                end = start + len(tokens)
                input_ids[row, start:end] = torch.tensor(tokens, dtype=torch.long)
                segments[row, start:end] = segment
                pair_ids[row, start:end] = i
                offset = 0 if segment == SEGMENT_PROMPT else n_shared
                position_ids[row, start:end] = torch.arange(offset, offset + len(tokens))
                if segment != SEGMENT_PROMPT:  # the response; its first token is the prompt's
                    labels[row, start + 1:end] = input_ids[row, start + 1:end]
                    if ld_alpha is not None:
                        weights[row, start + 1:end] = ld_weights(end - start - 1, shorter,
                                                                 ld_alpha)
                start = end
    batch = {"input_ids": input_ids, "attention_mask": (segments != SEGMENT_PAD).long(),
             "labels": labels, "position_ids": position_ids, "segments": segments,
             "pair_ids": pair_ids, "pair_rows": pair_rows, "blocks": layout}
    if ld_alpha is not None:
        batch["token_weights"] = weights
    return {**batch, **_per_pair(pairs)}
