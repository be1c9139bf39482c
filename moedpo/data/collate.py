"""Batches of preference pairs as model input.

`collate`: chosen rows, then rejected rows, right-padded with the tokenizer's pad id; labels
are the ids with prompt and padding positions set to `label_pad`. `pad_to=None` pads to the
batch's longest sequence, an int pads to exactly that length (static shapes for XLA). Pairs
carrying precomputed reference log-probs add `reference_logps` [2B], in the same row order.

`collate_shared` (data.share_prompt): one row per pair, the prompt once and both responses
after it, each response attending only to the prompt and itself (see `SEGMENT_*`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tokenize import TokenizedPair

# Segment of each position in a shared-prompt row. The last prompt token predicts a
# response's first token, so each response segment starts with its own copy of it.
SEGMENT_PROMPT, SEGMENT_CHOSEN, SEGMENT_REJECTED, SEGMENT_PAD = 0, 1, 2, 3


def _reference_logps(pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    if not all(p.reference is not None for p in pairs):
        return {}
    return {"reference_logps": torch.tensor([p.reference[0] for p in pairs]
                                            + [p.reference[1] for p in pairs])}


PadTo = int | Sequence[int] | None


def _padded_length(longest: int, pad_to: PadTo) -> int:
    """None: the longest sequence; an int: exactly that; lengths: the shortest that fits."""
    if pad_to is None:
        return longest
    fitting = [n for n in ([pad_to] if isinstance(pad_to, int) else pad_to) if n >= longest]
    if not fitting:
        raise ValueError(f"a sequence of {longest} tokens does not fit pad_to={pad_to}")
    return min(fitting)


def collate(pairs: list[TokenizedPair], pad_id: int, label_pad: int = -100,
            pad_to: PadTo = None) -> dict[str, torch.Tensor]:
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    length = _padded_length(max(len(prompt) + len(resp) for prompt, resp in sequences), pad_to)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), label_pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response, dtype=torch.long)
        labels[row, n_prompt:n] = input_ids[row, n_prompt:n]
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {**batch, **_reference_logps(pairs)}


def collate_shared(pairs: list[TokenizedPair], pad_id: int, label_pad: int = -100,
                   pad_to: PadTo = None) -> dict[str, torch.Tensor]:
    """Rows `prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected | pad`, with the position
    ids each token has in its own unshared sequence and a `segments` map from which the
    model's attention mask is built (models.shared_prompt). A response's first token is
    predicted from its own copy of the last prompt token, so every position predicts at most
    one label, and the log-probs equal the unshared ones."""
    rows = []
    for p in pairs:
        shared, last = p.prompt[:-1], p.prompt[-1:]
        rows.append((shared, last + p.chosen, last + p.rejected))
    length = _padded_length(max(sum(map(len, row)) for row in rows), pad_to)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), label_pad, dtype=torch.long)
    segments = torch.full((len(rows), length), SEGMENT_PAD, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (shared, chosen, rejected) in enumerate(rows):
        start = 0
        for segment, tokens in ((SEGMENT_PROMPT, shared), (SEGMENT_CHOSEN, chosen),
                                (SEGMENT_REJECTED, rejected)):
            end = start + len(tokens)
            input_ids[row, start:end] = torch.tensor(tokens, dtype=torch.long)
            segments[row, start:end] = segment
            offset = 0 if segment == SEGMENT_PROMPT else len(shared)
            position_ids[row, start:end] = torch.arange(offset, offset + len(tokens))
            if segment != SEGMENT_PROMPT:  # the response; its first token is the prompt's last
                labels[row, start + 1:end] = input_ids[row, start + 1:end]
            start = end
    batch = {"input_ids": input_ids, "attention_mask": (segments != SEGMENT_PAD).long(),
             "labels": labels, "position_ids": position_ids, "segments": segments}
    return {**batch, **_reference_logps(pairs)}
