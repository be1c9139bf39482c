"""Unpaired rows (prompt, completion, label) for KTO-style losses, carried in the pair
machinery: `chosen` is the row's completion and `rejected` a completion of another row, the
mismatched (x, y') whose policy/reference log-ratio estimates KTO's KL term (Ethayarajh et
al., arXiv 2402.01306, section 4.1). Every batch layout, the shared prompt, packing, the
chunked head, FSDP2 and a precomputed reference then work on them unchanged.

TRL rotates completions by one within each device batch; here they rotate by one along a
seeded permutation of the whole split, fixed for the run (and so for a resumed one): the
same distribution of mismatched pairs, whatever the batch size or the number of ranks."""

from __future__ import annotations

import random

from .pairs import DataError
from .tokenize import TokenizedPair


def labeled(pairs: list[TokenizedPair]) -> bool | None:
    """True if every pair is an unpaired row, False if none is, None if they are mixed."""
    kinds = {p.label is not None for p in pairs}
    return None if len(kinds) > 1 else (kinds.pop() if kinds else False)


def with_kl_completions(pairs: list[TokenizedPair], seed: int, max_length: int,
                        where: str) -> list[TokenizedPair]:
    """Each row's `rejected` := the completion of the next row in a seeded permutation, cut
    to what fits beside this row's prompt in max_length (at least one token: a kept row's
    prompt leaves room for its own completion)."""
    if len(pairs) < 2:
        raise DataError(f"{where}: {len(pairs)} unpaired row(s); KTO's KL estimate pairs each "
                        "prompt with another row's completion, so at least 2 are needed")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    out = list(pairs)
    for at, i in enumerate(order):
        other = pairs[order[(at + 1) % len(order)]].chosen
        room = max(max_length - len(pairs[i].prompt), 1)
        out[i] = TokenizedPair(pairs[i].prompt, pairs[i].chosen, other[:room],
                               label=pairs[i].label)
    return out
