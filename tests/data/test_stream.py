"""Streamed training data (data.streaming): the shuffle buffer, epochs, skipped rows, and a
resumed run that continues with exactly the pairs an unbroken one saw."""

import itertools

import pytest

from conftest import assert_same_run, chat_rows, tiny_train_overrides, train_rows
from moedpo.data.formats import parse_row
from moedpo.data.pairs import SkipLog
from moedpo.data.stream import PairStream, shuffled
from moedpo.data.tokenize import tokenize_pairs


def test_shuffle_buffer_keeps_every_row_once_seeded():
    out = list(shuffled(iter(range(100)), 10, seed=3))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert out == list(shuffled(iter(range(100)), 10, seed=3))
    assert list(shuffled(iter(range(5)), 1, seed=3)) == list(range(5))
    # A row comes out at most `buffer` places before where it went in.
    assert all(out.index(i) >= i - 10 for i in range(100))


def make_stream(tokenizer, rows, buffer=8, skipped=None):
    def open_rows():
        return ((r, f"f:{i}", parse_row) for i, r in enumerate(rows))

    def tokenize(pairs, log):
        return tokenize_pairs(pairs, tokenizer, 40, 20, "keep_start", log)
    return PairStream(open_rows, tokenize, seed=0, buffer=buffer,
                      skipped=skipped if skipped is not None else SkipLog())


def ids(pairs):
    return [(tuple(p.prompt), tuple(p.chosen)) for p in pairs]


def test_epochs_skips_and_a_restored_stream_continue_exactly(tokenizer):
    rows = chat_rows("train", 30)
    rows[4] = {"oops": 1}  # fits no format: skipped, not fatal, in a stream
    rows[9] = {**rows[9], "chosen": [{"role": "assistant", "content": ""}]}  # empty reply
    skipped = SkipLog()
    stream = make_stream(tokenizer, rows, skipped=skipped)
    steps = [stream.take(7) for _ in range(12)]  # 84 pairs: 3 epochs of 28 usable rows
    epochs = [sorted(ids(sum(steps, [])[e * 28:(e + 1) * 28])) for e in range(3)]
    assert epochs[0] == epochs[1] == epochs[2] and len(set(epochs[0])) == 28
    assert sum(steps, [])[:28] != sum(steps, [])[28:56]  # each epoch shuffled anew
    assert skipped.counts["empty chosen response"] == 3 and skipped.total == 6
    for at in (1, 4, 5, 8):  # mid-epoch, just before and after an epoch's end
        again = make_stream(tokenizer, rows)
        replay = make_stream(tokenizer, rows)
        for _ in range(at):
            replay.take(7)
        again.restore(replay.state())
        assert [ids(again.take(7)) for _ in range(12 - at)] == [ids(s) for s in steps[at:]]


def test_a_stream_without_usable_rows_stops_with_the_reasons(tokenizer):
    from moedpo.data.pairs import DataError

    with pytest.raises(DataError, match="no usable pair .*not a preference row"):
        make_stream(tokenizer, [{"oops": 1}] * 5).take(2)


def test_streamed_run_resumes_exactly(make_cfg):
    from moedpo.trainer import run

    common = [*tiny_train_overrides(), "dry_run=false", "data.streaming=true",
              "data.shuffle_buffer=64", "do_first_eval=false", "eval_frequency=100",
              "report_metrics_freq=1", "checkpoint.save_frequency=2"]
    straight = run(make_cfg(*common, "max_steps=4", "exp_name=straight"))
    run(make_cfg(*common, "max_steps=2", "exp_name=resumed"))
    resumed = run(make_cfg(*common, "max_steps=4", "exp_name=resumed"))
    assert_same_run(straight.run_dir, resumed.run_dir, atol=1e-5)
    rows = train_rows(resumed.run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [0, 1, 2, 3]


def test_streaming_settings_that_need_the_whole_set_are_refused(make_cfg):
    from moedpo.config import ConfigError
    from moedpo.validate import validate

    for extra, message in (("reference.precompute=true", "with reference.precompute"),
                           ("n_epochs=1", "with n_epochs"), ("max_steps=null", "set max_steps")):
        with pytest.raises(ConfigError, match=message):
            validate(make_cfg("data.streaming=true", *extra.split()))


def test_takes_are_endless(tokenizer):
    stream = make_stream(tokenizer, chat_rows("train", 5), buffer=1)
    got = list(itertools.chain.from_iterable(stream.take(3) for _ in range(5)))
    assert ids(got) == ids(got[:5]) * 3  # buffer 1: file order, epoch after epoch


def test_streamed_pairs_are_counted_not_kept(make_cfg, tokenizer):
    """A stream has no end: its truncation counts grow, its per-pair lengths are not kept."""
    from moedpo.data import build_data

    cfg = make_cfg(*tiny_train_overrides(), "data.streaming=true", "max_length=40",
                   "max_prompt_length=20")
    data = build_data(cfg, tokenizer, vocab_size=len(tokenizer))
    kept = {k: len(v) for k, v in data.tokenized.lengths.items()}
    cut = sum(data.tokenized.counts.values())
    steps = data.train_steps(cfg, step_size=4)
    for _ in range(30):  # 120 pairs: three epochs of the demo's 40
        next(steps)
    assert {k: len(v) for k, v in data.tokenized.lengths.items()} == kept
    assert sum(data.tokenized.counts.values()) > cut
