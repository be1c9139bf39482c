import pytest
import torch

from moedpo.data.collate import collate, collate_shared
from moedpo.data.loader import epoch_order, eval_indices, train_indices
from moedpo.data.synthetic import synthetic_pairs
from moedpo.data.tokenize import TokenizedPair


def test_collate_layout_labels_and_padding():
    pairs = [TokenizedPair([5, 6], [7, 8, 9], [10]), TokenizedPair([11], [12], [13, 14])]
    batch = collate(pairs, pad_id=0, label_pad=-100)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9], [11, 12, 0, 0, 0],  # chosen rows
        [5, 6, 10, 0, 0], [11, 13, 14, 0, 0],  # rejected rows
    ]
    assert batch["labels"].tolist() == [
        [-100, -100, 7, 8, 9], [-100, 12, -100, -100, -100],
        [-100, -100, 10, -100, -100], [-100, 13, 14, -100, -100],
    ]
    assert batch["attention_mask"].sum(1).tolist() == [5, 2, 3, 3]


def test_collate_static_shape():
    batch = collate([TokenizedPair([1], [2], [3])], pad_id=9, pad_to=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [1, 2] + [9] * 6


def test_synthetic_inputs_are_not_label_pad():
    pairs = synthetic_pairs(3, max_length=10, vocab_size=50, seed=0)
    batch = collate(pairs, pad_id=0, pad_to=10)
    assert (batch["input_ids"] >= 0).all() and (batch["input_ids"] < 50).all()
    assert (batch["labels"][:, :5] == -100).all()
    assert torch.equal(batch["labels"][:, 5:], batch["input_ids"][:, 5:])
    assert batch["attention_mask"].all()


def test_train_stream_cycles_reshuffles_and_resumes():
    stream = train_indices(10, 4, seed=3, shuffle=True)
    steps = [next(stream) for _ in range(6)]  # 2 steps per epoch, 3 epochs
    assert steps[0] + steps[1] == epoch_order(10, 0, 3, True)[:8]
    assert steps[2] + steps[3] == epoch_order(10, 1, 3, True)[:8]
    assert steps[0] != steps[2]
    resumed = train_indices(10, 4, seed=3, shuffle=True, start_step=3)
    assert [next(resumed) for _ in range(3)] == steps[3:]


def test_unshuffled_stream_is_file_order():
    stream = train_indices(5, 2, seed=0, shuffle=False)
    assert [next(stream) for _ in range(3)] == [[0, 1], [2, 3], [0, 1]]


def test_eval_keeps_every_pair():
    assert list(eval_indices(5, 2)) == [([0, 1], 2), ([2, 3], 2), ([4], 1)]


def test_eval_split_over_ranks_covers_each_pair_once_with_equal_batch_counts():
    per_rank = [list(eval_indices(7, 2, rank, world=2)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    counted = [i for batches in per_rank for idx, valid in batches for i in idx[:valid]]
    assert sorted(counted) == list(range(7))
    assert per_rank[1][1] == ([6], 1) and per_rank[0][1] == ([4, 5], 2)
    assert list(eval_indices(3, 2, 1, world=2)) == [([2], 1)]
    assert list(eval_indices(2, 2, 1, world=2)) == [([0], 0)]  # nothing left: a padding batch


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_length_grouping_keeps_every_pair_and_cuts_padding():
    g = torch.Generator().manual_seed(0)
    n, step = 1000, 8
    lengths = torch.randint(5, 500, (n,), generator=g).tolist()
    per_epoch = n // step
    plain = take(train_indices(n, step, seed=3, shuffle=True), per_epoch)
    grouped = take(train_indices(n, step, seed=3, shuffle=True, lengths=lengths), 2 * per_epoch)
    for epoch in range(2):  # same pairs per epoch as the plain order, each once
        steps = grouped[epoch * per_epoch:(epoch + 1) * per_epoch]
        used = [i for s in steps for i in s]
        assert len(set(used)) == len(used) == per_epoch * step
        plain_epoch = epoch_order(n, epoch, 3, True)[:per_epoch * step]
        assert sorted(used) == sorted(plain_epoch)
        assert all([lengths[i] for i in s] == sorted((lengths[i] for i in s), reverse=True)
                   for s in steps)

    def padded_tokens(steps):
        return sum(max(lengths[i] for i in s) * len(s) for s in steps)
    assert padded_tokens(grouped[:per_epoch]) < 0.6 * padded_tokens(plain)
    # Steps come in shuffled order: the longest step is not always first.
    firsts = [max(lengths[i] for i in s) for s in grouped[:per_epoch]]
    assert firsts != sorted(firsts, reverse=True)
    # A resumed stream continues the same grouped order.
    resumed = take(train_indices(n, step, 3, True, start_step=per_epoch + 5, lengths=lengths), 10)
    assert resumed == grouped[per_epoch + 5:per_epoch + 15]


def test_collate_shared_layout_by_hand():
    """prompt [5 6 7], chosen [8 9], rejected [10]: one row `5 6 | 7 8 9 | 7 10 | pad`."""
    batch = collate_shared([TokenizedPair([5, 6, 7], [8, 9], [10]),
                            TokenizedPair([3], [4], [5, 6, 7])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10], [3, 4, 3, 5, 6, 7, 0]]
    # Each token's position in its own unshared sequence (pads 0).
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 1, 2, 3, 0]]
    P, C, R, X = 0, 1, 2, 3
    assert batch["segments"].tolist() == [[P, P, C, C, C, R, R], [C, C, R, R, R, R, X]]
    # Labels only on response tokens; a response's first token is predicted from its own
    # copy of the last prompt token, never from the other response.
    n = -100
    assert batch["labels"].tolist() == [[n, n, n, 8, 9, n, 10], [n, 4, n, 5, 6, 7, n]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]


def test_collate_pads_to_the_shortest_bucket_that_fits():
    short, long_ = TokenizedPair([1, 2], [3], [4, 5]), TokenizedPair([1] * 5, [2] * 4, [3])
    assert collate([short], 0, pad_to=[4, 8, 16])["input_ids"].shape == (2, 4)
    assert collate([short, long_], 0, pad_to=[4, 8, 16])["input_ids"].shape == (4, 16)
    assert collate([short], 0, pad_to=[16, 4])["input_ids"].shape == (2, 4)  # any order
    with pytest.raises(ValueError, match="does not fit"):
        collate([long_], 0, pad_to=[4, 8])
