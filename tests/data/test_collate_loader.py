import torch

from moedpo.data.collate import collate
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
