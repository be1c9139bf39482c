"""Batches of preference pairs as one concatenated model input: chosen rows, then rejected.

Right padding with the tokenizer's pad id; labels are the ids with prompt and padding
positions set to `label_pad`. `pad_to=None` pads to the batch's longest sequence, an int
pads to exactly that length (static shapes for XLA). Pairs carrying precomputed reference
log-probs add `reference_logps` [2B], in the same row order.
"""

from __future__ import annotations

import torch

from .tokenize import TokenizedPair


def collate(pairs: list[TokenizedPair], pad_id: int, label_pad: int = -100,
            pad_to: int | None = None) -> dict[str, torch.Tensor]:
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    longest = max(len(prompt) + len(resp) for prompt, resp in sequences)
    length = longest if pad_to is None else pad_to
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit pad_to={length}")
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), label_pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(prompt + response, dtype=torch.long)
        labels[row, n_prompt:n] = input_ids[row, n_prompt:n]
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if all(p.reference is not None for p in pairs):  # precomputed: rows as in the batch
        batch["reference_logps"] = torch.tensor([p.reference[0] for p in pairs]
                                                + [p.reference[1] for p in pairs])
    return batch
