"""How one optimizer step's pairs become this rank's forwards (micro-batches).

A step holds `per_device_train_batch_size x ranks x gradient_accumulation_steps` pairs
(data/loader.py decides which). Each rank takes its own share of them, the same pairs
whichever way it cuts them:

- by count (the default): `gradient_accumulation_steps` forwards of
  `per_device_train_batch_size` pairs;
- by tokens (`data.tokens_per_batch`): as many forwards as it takes to hold the share with
  at most that many tokens in each, as the rows will be laid out (packed rows: the sum of
  the pairs' blocks; padded rows: rows x the longest). A pair longer than the budget gets a
  forward of its own. Every rank runs the same number of forwards (sharded models need all
  ranks in each), found without communication: each rank cuts every rank's share.

The loss of a forward is weighted by its share of the rank's pairs (`weights`), so the step's
loss is the mean over its pairs however they were cut: a step by tokens computes the same
gradient as a step by count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .collate import pack_rows
from .tokenize import TokenizedPair

Cost = Callable[[TokenizedPair], int]


def row_tokens(shared: bool) -> Cost:
    """Tokens a pair puts in the rows of a batch: its shared-prompt block (`prompt + chosen
    + rejected + 1`), or its two plain rows, each padded to the longer response."""
    if shared:
        return lambda p: len(p.prompt) + len(p.chosen) + len(p.rejected) + 1
    return lambda p: 2 * (len(p.prompt) + max(len(p.chosen), len(p.rejected)))


def by_tokens(costs: Sequence[int], budget: int, packed: bool) -> list[list[int]]:
    """Indices cut into groups of at most `budget` tokens (a longer one alone). Packed rows
    cost the sum of their pairs (first-fit decreasing); padded rows cost pairs x the longest,
    so longest first, each group as full as the budget allows."""
    if packed:
        return pack_rows(list(costs), budget)
    groups: list[list[int]] = []
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        # longest first: a group's cost is its size times its first (longest) pair's
        if groups and (len(groups[-1]) + 1) * costs[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _split_to(groups: list[list[int]], count: int) -> list[list[int]]:
    """`groups` split (the one with most pairs in halves) until there are `count` of them;
    halves of a group within the budget stay within it."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        group = groups.pop(largest)
        if len(group) < 2:
            raise ValueError(f"cannot cut {sum(map(len, groups)) + 1} pairs into {count} "
                             "micro-batches")
        half = len(group) // 2
        groups[largest:largest] = [group[:half], group[half:]]
    return groups


def rank_shares(pairs: Sequence, world: int, micro: int) -> list[list]:
    """Each rank's pairs of a step: rank r takes pairs r*micro .. (r+1)*micro of every
    `micro x world` slice (the order every run of moedpo has used)."""
    return [[p for start in range(0, len(pairs), micro * world)
             for p in pairs[start + rank * micro:][:micro]] for rank in range(world)]


def micro_batches(pairs: Sequence[TokenizedPair], rank: int, world: int, micro: int,
                  budget: int | None = None, cost: Cost | None = None,
                  packed: bool = False) -> list[list[TokenizedPair]]:
    """This rank's forwards of one step: by count (`budget` None), or by tokens."""
    shares = rank_shares(pairs, world, micro)
    if budget is None:
        mine = shares[rank]
        return [mine[i:i + micro] for i in range(0, len(mine), micro)]
    cuts = [by_tokens([cost(p) for p in share], budget, packed) for share in shares]
    count = max(len(c) for c in cuts)
    return [[shares[rank][i] for i in group] for group in _split_to(cuts[rank], count)]


def weights(chunks: Sequence[Sequence]) -> list[float]:
    """Each forward's share of this rank's pairs: the factor on its (per-pair mean) loss."""
    total = sum(len(c) for c in chunks)
    return [len(c) / total for c in chunks]
