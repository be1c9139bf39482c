"""Weighted mixtures of sources (data.weights) and per-source eval metrics."""

import itertools
from collections import Counter

import pytest
import torch

from moedpo.data.loader import mixture_counts, train_indices
from moedpo.metrics import MeanMetrics

SIZES, WEIGHTS = [100, 200], [0.7, 0.3]  # source 0: 100 pairs, asked for 70% of 300 a epoch


def stream(seed=0, start=0, steps=90, mixture=(SIZES, WEIGHTS)):
    return list(itertools.islice(train_indices(sum(SIZES), 10, seed, True, start, None,
                                               mixture), steps))


def test_each_epoch_draws_each_source_in_its_proportion():
    assert mixture_counts(SIZES, WEIGHTS) == [210, 90]
    steps = stream()
    for epoch in range(3):
        drawn = [i for step in steps[epoch * 30:(epoch + 1) * 30] for i in step]
        assert Counter(i < 100 for i in drawn) == {True: 210, False: 90}


def test_sources_repeat_only_after_all_their_pairs_came():
    drawn = [i for step in stream() for i in step]  # 3 epochs
    # Up-weighted: 630 draws of 100 pairs, 6.3 rounds of the chain: each pair 6 or 7 times.
    up = Counter(i for i in drawn if i < 100)
    assert len(up) == 100 and set(up.values()) == {6, 7} and sum(up.values()) == 630
    # Down-weighted: 90 of 200 an epoch; the first two epochs (180 < 200) never repeat.
    down = [i for i in drawn if i >= 100]
    assert len(set(down[:180])) == 180 and Counter(down).most_common(1)[0][1] == 2


def test_a_resumed_stream_sees_the_same_pairs_and_the_seed_matters():
    whole = stream()
    assert stream(start=37, steps=53) == whole[37:]
    assert stream(seed=1) != whole


def test_weights_zero_leaves_a_source_out():
    drawn = [i for step in stream(mixture=(SIZES, [1.0, 0.0])) for i in step]
    assert max(drawn) < 100 and len(drawn) == 900


class Gather:
    """A backend of 2 ranks in one process: the other rank's key names are joined and its
    flat tensor is added (`other` a Gather that saw the other rank's reduce)."""

    distributed, world_size = True, 2

    def __init__(self, other: "Gather | None" = None):
        self.other, self.seen, self.names = other, None, []

    def union(self, names):
        self.names = sorted(set(names) | set(self.other.names if self.other else []))
        return self.names

    def all_reduce_sum(self, tensor):
        self.seen = tensor
        return tensor if self.other is None else tensor + self.other.seen


def reduce_two(first: MeanMetrics, second: MeanMetrics) -> MeanMetrics:
    """`first` reduced with `second` as the other rank: both see the union of their keys."""
    names = Gather()
    second.reduced(names)  # its own names
    first.reduced(names)  # names of both, so first's flat tensor has every key
    other = Gather(names)
    second.reduced(other)  # the other rank's flat tensor over the union
    return first.reduced(Gather(other))


def test_per_source_eval_means_over_ranks_equal_a_hand_computation():
    acc = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    labels = ["a", "b", "a", "b", "b", "a"]
    ranks = []
    for part in (slice(0, 4), slice(4, 6)):  # rank 1 holds no pair of source "a"... almost
        m = MeanMetrics()
        m.add({"rewards/accuracies": acc[part]})
        m.add_grouped({"rewards/accuracies": acc[part]}, labels[part], ["a", "b"])
        ranks.append(m)
    means = reduce_two(ranks[0], ranks[1]).means()
    assert means["rewards/accuracies"] == pytest.approx(4 / 6)
    assert means["a/rewards/accuracies"] == pytest.approx(3 / 3)
    assert means["b/rewards/accuracies"] == pytest.approx(1 / 3)
    assert means["a/num_examples"] == 3 and means["b/num_examples"] == 3


def test_a_rank_with_no_pair_reduces_with_one_that_has_some():
    """An eval set smaller than a round of eval batches leaves a rank no pair: its window
    holds no keys at all, and the reduce still gives the other rank's means."""
    full, empty = MeanMetrics(), MeanMetrics()
    full.add({"loss": torch.tensor([0.5, 0.7]), "kl": torch.tensor([0.1, 0.1])})
    full.add_scalars({"grad_norm": 2.0})
    full.expert_counts = torch.tensor([[3.0, 1.0]])
    for a, b in ((full, empty), (empty, full)):
        means = reduce_two(a, b).means()
        assert means["loss"] == pytest.approx(0.6) and means["kl"] == pytest.approx(0.1)
        assert means["num_examples"] == 2 and means["grad_norm"] == 2.0
        assert means["moe/expert_load"] == [[1.5, 0.5]]


def test_mixed_run_of_text_and_chat_sources_reports_each_source(make_cfg):
    import json

    from conftest import tiny_train_overrides
    from moedpo.trainer import run

    cfg = make_cfg(*tiny_train_overrides(), "datasets=[demo,demo_chat]", "dry_run=false",
                   "data.weights=[0.75,0.25]", "max_steps=2", "eval_frequency=100",
                   "per_device_eval_batch_size=100", "do_first_eval=false")
    result = run(cfg)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval/loss" in r][-1]
    assert final["eval/demo/num_examples"] == final["eval/demo_chat/num_examples"] == 200
    both = [final[f"eval/{s}/rewards/accuracies"] for s in ("demo", "demo_chat")]
    assert final["eval/rewards/accuracies"] == pytest.approx(sum(both) / 2)
