"""Which pairs each step sees.

The train stream cycles through epochs, reshuffling each from `seed + epoch`, and always hands
out full step batches (the ragged end of an epoch is left for the next shuffle). A step's
batch depends only on its step number, so resuming at step s sees exactly what an unbroken
run would have seen there.

With `lengths` (data.group_by_length), each epoch's order is regrouped so that a step holds
pairs of similar length, which dynamic padding then turns into less padding: windows of
GROUP_WINDOW steps are sorted by length and cut into steps, and the steps are shuffled.
Every pair still comes once per epoch, and the order is still a function of (seed, epoch).

With a `mixture` (data.weights over several sources), an epoch is as many pairs as the sources
hold together, source i giving round(weight_i x that) of them: each source is read through an
endless chain of its own shuffles, so an up-weighted source repeats its pairs only after all
of them came, and a down-weighted one is sampled without repeats. The draws of epoch e are
the places e x n_i .. (e+1) x n_i of those chains: still a function of (seed, epoch), so a
resumed run sees the same pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

GROUP_WINDOW = 64  # steps per length-sorted window: wide enough to find equal lengths,
# narrow enough that the longest pairs do not all land in one part of the epoch


def steps_per_epoch(n_pairs: int, step_size: int) -> int:
    return n_pairs // step_size


def epoch_order(n_pairs: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n_pairs))
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n_pairs, generator=generator).tolist()


def source_chain(size: int, start: int, count: int, seed: int, shuffle: bool) -> list[int]:
    """Places start .. start+count of a source's endless chain of shuffles of range(size)."""
    out, cycle = [], start // size
    offset = start % size
    while len(out) < count:
        order = (torch.randperm(size, generator=torch.Generator().manual_seed(seed + cycle))
                 .tolist() if shuffle else list(range(size)))
        out += order[offset:offset + count - len(out)]
        cycle, offset = cycle + 1, 0
    return out


def mixture_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Pairs each source gives an epoch of the mixture."""
    total, norm = sum(sizes), sum(weights)
    return [round(total * w / norm) for w in weights]


def mixture_order(sizes: list[int], weights: list[float], epoch: int, seed: int,
                  shuffle: bool) -> list[int]:
    """One epoch of a weighted mixture of sources (global indices: sources in order)."""
    counts = mixture_counts(sizes, weights)
    order, first = [], 0
    for source, (size, count) in enumerate(zip(sizes, counts, strict=True)):
        chain_seed = seed + 1_000_003 * (source + 1)  # each source its own chain of shuffles
        order += [first + i for i in source_chain(size, epoch * count, count, chain_seed,
                                                  shuffle)]
        first += size
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
    return order


def group_by_length(order: list[int], lengths: list[int], step_size: int, epoch: int,
                    seed: int, shuffle: bool) -> list[int]:
    """`order`'s full steps regrouped by length (longest first within a step); the ragged
    tail stays at the end, as before."""
    full = len(order) - len(order) % step_size
    steps = []
    for start in range(0, full, step_size * GROUP_WINDOW):
        window = sorted(order[start:min(start + step_size * GROUP_WINDOW, full)],
                        key=lambda i: -lengths[i])
        steps += [window[i:i + step_size] for i in range(0, len(window), step_size)]
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch + 7919)
        steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    return [i for step in steps for i in step] + order[full:]


def train_indices(n_pairs: int, step_size: int, seed: int, shuffle: bool,
                  start_step: int = 0, lengths: list[int] | None = None,
                  mixture: tuple[list[int], list[float]] | None = None) -> Iterator[list[int]]:
    """Indices of each step's pairs, forever, from `start_step` on; grouped by `lengths`
    when given; drawn from the sources by weight with `mixture` = (sizes, weights)."""
    if mixture is not None:
        n_pairs = sum(mixture_counts(*mixture))
    per_epoch = steps_per_epoch(n_pairs, step_size)
    if per_epoch < 1:
        raise ValueError(f"the training set has {n_pairs} pairs, fewer than one step's "
                         f"{step_size} (batch x devices x gradient_accumulation_steps)")
    step, cached_epoch, order = start_step, -1, []
    while True:
        epoch, position = divmod(step, per_epoch)
        if epoch != cached_epoch:
            order = (mixture_order(*mixture, epoch, seed, shuffle) if mixture is not None
                     else epoch_order(n_pairs, epoch, seed, shuffle))
            cached_epoch = epoch
            if lengths is not None:
                order = group_by_length(order, lengths, step_size, epoch, seed, shuffle)
        yield order[position * step_size:(position + 1) * step_size]
        step += 1


def eval_indices(n_pairs: int, batch_size: int, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[list[int], int]]:
    """(indices, valid) of this rank's eval batches: every pair once over all ranks, in file
    order. Every rank runs the same number of batches (sharded models need all ranks in each
    forward), so batches past the data repeat pair 0; only the first `valid` pairs count."""
    per_round = batch_size * world
    for start in range(0, n_pairs, per_round):
        mine = range(start + rank * batch_size, min(start + (rank + 1) * batch_size, n_pairs))
        yield (list(mine) or [0]), len(mine)
