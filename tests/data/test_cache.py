"""The tokenisation cache: a second start reads what the first tokenised, and anything that
changes the ids (the data, the tokenizer or its template, a setting) makes a new entry."""

import json
import logging
import os

import pytest

from conftest import chat_rows, write_jsonl_gz
from moedpo.data import DataError, build_data
from moedpo.data import sources as sources_module
from moedpo.data.formats import parse_row
from moedpo.data.pairs import SkipLog
from moedpo.data.tokenize import TokenizeStats, tokenize_pairs, tokenize_parallel


@pytest.fixture
def folder(tmp_path):
    rows = chat_rows("train", 40)
    (tmp_path / "data").mkdir()
    write_jsonl_gz(tmp_path / "data" / "train.jsonl.gz", rows + [{"prompt": "only"}])
    write_jsonl_gz(tmp_path / "data" / "test.jsonl.gz", chat_rows("test", 10))
    return tmp_path / "data"


def build(make_cfg, tokenizer, folder, tmp_path, *overrides):
    cfg = make_cfg("+experiment=demo", f"datasets=[{folder}]", "per_device_train_batch_size=4",
                   f"data.cache_dir={tmp_path / 'cache'}", *overrides)
    return build_data(cfg, tokenizer, 512)


def summary(data):
    return ([(list(p.prompt), list(p.chosen), list(p.rejected)) for p in data.train + data.eval],
            dict(data.skipped.counts), data.skipped.examples, data.tokenized.lengths,
            dict(data.tokenized.counts), dict(data.formats[next(iter(data.formats))]))


def entries(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))


def test_a_second_start_reads_the_cache_and_gives_the_same_data(make_cfg, tokenizer, folder,
                                                                  tmp_path, monkeypatch):
    first = build(make_cfg, tokenizer, folder, tmp_path, "max_length=48", "max_prompt_length=24")
    assert len(entries(tmp_path)) == 2  # train and test
    assert first.skipped.total == 1 and first.tokenized.counts["prompt"]  # cut and skipped

    def no_reading(*args, **kwargs):
        raise AssertionError("read the rows again")
    monkeypatch.setattr("moedpo.data.read_pairs", no_reading)
    second = build(make_cfg, tokenizer, folder, tmp_path, "max_length=48", "max_prompt_length=24")
    assert summary(second) == summary(first)


def test_data_tokenizer_and_settings_each_make_a_new_entry(make_cfg, tokenizer, folder,
                                                           tmp_path):
    build(make_cfg, tokenizer, folder, tmp_path)
    build(make_cfg, tokenizer, folder, tmp_path, "max_length=64")
    assert len(entries(tmp_path)) == 4
    rows = chat_rows("train", 41)
    write_jsonl_gz(folder / "train.jsonl.gz", rows)  # edited in place
    os.utime(folder / "train.jsonl.gz", ns=(1, 10**18))  # whatever the clock's resolution
    edited = build(make_cfg, tokenizer, folder, tmp_path)
    assert len(edited.train) == 41 and len(entries(tmp_path)) == 5
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    other = build(make_cfg, tokenizer.__class__.from_pretrained(tokenizer.name_or_path), folder,
                  tmp_path, f"data.chat_template={template}")
    assert len(entries(tmp_path)) == 7 and other.train[0].prompt != edited.train[0].prompt


def test_a_torn_entry_is_rebuilt_and_an_unwritable_cache_only_warns(make_cfg, tokenizer, folder,
                                                                     tmp_path, caplog):
    first = build(make_cfg, tokenizer, folder, tmp_path)
    for entry in entries(tmp_path):
        (tmp_path / "cache" / entry / "ids.npy").write_bytes(b"\x93NUMPY torn")
    assert summary(build(make_cfg, tokenizer, folder, tmp_path)) == summary(first)
    (tmp_path / "a_file").write_text("")  # no folder can be made under it, even by root
    with caplog.at_level(logging.WARNING, logger="moedpo"):
        again = build(make_cfg, tokenizer, folder, tmp_path, f"data.cache_dir={tmp_path}/a_file/c")
    assert summary(again) == summary(first)
    assert "tokenisation cache not written (NotADirectoryError" in caplog.text


def test_strict_mode_stops_on_a_cached_skip(make_cfg, tokenizer, folder, tmp_path):
    build(make_cfg, tokenizer, folder, tmp_path)
    with pytest.raises(DataError, match=r"train.jsonl.gz:41: .*data.strict=true"):
        build(make_cfg, tokenizer, folder, tmp_path, "data.strict=true")


def test_dry_runs_are_not_cached(make_cfg, tokenizer, folder, tmp_path):
    build(make_cfg, tokenizer, folder, tmp_path, "dry_run=true")
    assert not (tmp_path / "cache").exists()


def test_worker_processes_give_the_same_pairs_in_order(tokenizer):
    pairs = [parse_row(r, f"r:{i}") for i, r in enumerate(chat_rows("train", 2000) * 3)]
    pairs[7] = parse_row({**chat_rows("train", 1)[0], "prompt": [{"role": "tool",
                                                                  "content": "x"}]}, "bad")
    one, many = (SkipLog(), TokenizeStats()), (SkipLog(), TokenizeStats())
    settings = (40, 20, "keep_end", False, False)
    a = tokenize_pairs(pairs, tokenizer, *settings[:3], *one, *settings[3:])
    b = tokenize_parallel(pairs, tokenizer, 2, *many, *settings)
    assert [(list(p.prompt), list(p.chosen)) for p in a] == \
        [(list(p.prompt), list(p.chosen)) for p in b]
    assert one[0].counts == many[0].counts and one[1].lengths == many[1].lengths
    assert json.dumps(one[1].counts) == json.dumps(many[1].counts)


def test_sources_module_still_reads_without_the_cache(folder):
    assert len(sources_module.load_pairs(str(folder), "train", {}, SkipLog())) == 40
