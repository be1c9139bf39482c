"""Random-token pairs for throughput runs without a dataset (`use_synthetic_data=true`).

Each pair is a prompt of max_length/2 random tokens and two responses filling the rest, so a
collated sequence is exactly max_length long with the first half of its labels masked. Unlike
the original, inputs and labels are separate tensors (it wrote -100 into the inputs).
"""

from __future__ import annotations

import torch

from .tokenize import TokenizedPair


def synthetic_pairs(n: int, max_length: int, vocab_size: int, seed: int) -> list[TokenizedPair]:
    generator = torch.Generator().manual_seed(seed)
    half = max_length // 2
    ids = torch.randint(0, vocab_size, (n, half + 2 * (max_length - half)), generator=generator)
    return [TokenizedPair(row[:half].tolist(), row[half:max_length].tolist(),
                          row[max_length:].tolist()) for row in ids]
