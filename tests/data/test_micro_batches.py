"""data/micro_batches.py: a step's pairs cut into this rank's forwards, by count or by token
budget; the same pairs either way, and the run's gradients the same."""

import random
from collections import Counter

import pytest

from conftest import assert_same_run, tiny_train_overrides
from moedpo.data.micro_batches import by_tokens, micro_batches, row_tokens, weights
from moedpo.data.tokenize import TokenizedPair


def test_by_tokens_by_hand():
    # padded rows: longest first, a group costs its size x its longest
    assert by_tokens([10, 40, 20, 30], budget=60, packed=False) == [[1], [3, 2], [0]]
    # [40]: 40; [30, 20]: 2 x 30 = 60; [10]: a third of 30 would be 90
    assert by_tokens([10, 40, 20, 30], budget=100, packed=False) == [[1, 3], [2, 0]]
    # packed rows: the sum, first-fit decreasing
    assert by_tokens([10, 40, 20, 30], budget=60, packed=True) == [[1, 2], [3, 0]]
    assert by_tokens([70, 5], budget=60, packed=True) == [[0], [1]]  # too long: alone


def test_row_tokens_counts_the_layouts():
    pair = TokenizedPair([1] * 5, [2] * 3, [3] * 7)
    assert row_tokens(True)(pair) == 5 + 3 + 7 + 1  # prompt[:-1], prompt[-1] twice
    assert row_tokens(False)(pair) == 2 * (5 + 7)  # two rows padded to the longer one


def test_by_count_is_the_old_slicing():
    pairs = list(range(24))  # world 2, micro 3, 4 accumulation steps
    assert micro_batches(pairs, 0, 2, 3) == [[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 20]]
    assert micro_batches(pairs, 1, 2, 3) == [[3, 4, 5], [9, 10, 11], [15, 16, 17],
                                             [21, 22, 23]]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("world", [1, 3])
def test_by_tokens_keeps_each_ranks_pairs_within_the_budget(world, packed):
    rng = random.Random(world)
    pairs = [TokenizedPair([1] * rng.randrange(1, 200), [2] * rng.randrange(1, 40),
                           [3] * rng.randrange(1, 40)) for _ in range(8 * world * 4)]
    cost, budget = row_tokens(True), 600
    cuts = [micro_batches(pairs, r, world, 8, budget, cost, packed) for r in range(world)]
    assert len({len(c) for c in cuts}) == 1  # every rank runs as many forwards
    assert len(cuts[0]) > 4  # more forwards than by count: the budget binds
    for rank, chunks in enumerate(cuts):
        by_count = micro_batches(pairs, rank, world, 8)
        assert Counter(map(id, (p for c in chunks for p in c))) == Counter(
            map(id, (p for c in by_count for p in c)))  # the same pairs, each once
        for chunk in chunks:
            costs = [cost(p) for p in chunk]
            laid_out = sum(costs) if packed else len(chunk) * max(costs)
            assert laid_out <= budget or len(chunk) == 1
        assert sum(weights(chunks)) == pytest.approx(1.0)


def test_ranks_with_fewer_cuts_split_their_largest():
    """Rank 0's short pairs fit in one forward, rank 1's long ones need four: rank 0 splits
    its one group so both run four forwards."""
    short, long = TokenizedPair([1], [2], [3]), TokenizedPair([1] * 90, [2], [3])
    pairs = [short] * 4 + [long] * 4
    cut = [micro_batches(pairs, r, 2, 4, 100, row_tokens(True), True) for r in range(2)]
    assert [len(c) for c in cut] == [4, 4]
    assert sorted(len(c) for c in cut[0]) == [1, 1, 1, 1]


def test_training_by_tokens_equals_by_count(make_cfg, tmp_path, monkeypatch):
    """8 pairs a step cut by a 300-token budget into several forwards: the same losses,
    metrics and weights as one forward of 8 (router losses off: they are per forward)."""
    import moedpo.trainer as train

    forwards = []

    def counted(*args, **kwargs):
        chunks = micro_batches(*args, **kwargs)
        forwards.append(len(chunks))
        return chunks
    monkeypatch.setattr(train, "micro_batches", counted)
    common = [*tiny_train_overrides(), "per_device_train_batch_size=8", "max_steps=3",
              "model.router_aux_loss_coef=0", "model.router_z_loss_coef=0"]
    train.run(make_cfg(*common, "exp_name=count"))
    assert forwards == [1, 1, 1]
    train.run(make_cfg(*common, "exp_name=tokens", "data.tokens_per_batch=300"))
    assert min(forwards[3:]) > 1
    assert_same_run(tmp_path / "count", tmp_path / "tokens", atol=1e-5, rel=1e-5,
                    ignore=("aux_loss", "z_loss"))


def test_tokens_per_batch_refused_with_static_shapes(make_cfg, monkeypatch):
    from moedpo.config import ConfigError
    from moedpo.validate import validate

    with pytest.raises(ConfigError, match="data.tokens_per_batch cuts steps"):
        validate(make_cfg("data.tokens_per_batch=512", "data.static_shapes=true"))
    # Static by default on XLA, also where parallel.backend=auto resolves to it: refused
    # before anything loads (it was a second check in train.py after the model loaded).
    import moedpo.layout as layout

    monkeypatch.setattr(layout, "choose_kind", lambda requested: "xla")
    with pytest.raises(ConfigError, match="data.tokens_per_batch cuts steps"):
        validate(make_cfg("data.tokens_per_batch=512", "parallel.backend=auto"))
    monkeypatch.setattr(layout, "choose_kind", lambda requested: "cpu")
    validate(make_cfg("data.tokens_per_batch=512", "parallel.backend=auto"))
    with pytest.raises(ConfigError, match="router_aux_loss_scope=global_batch: the pooled"):
        validate(make_cfg("data.tokens_per_batch=512",
                          "model.router_aux_loss_scope=global_batch"))
    with pytest.raises(ConfigError, match="data.tokens_per_batch=0: must be > 0"):
        validate(make_cfg("data.tokens_per_batch=0"))
