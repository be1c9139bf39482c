"""Damaged and odd data inputs end in one DataError line naming the file (or skip just the
row that is wrong), never in a library's traceback."""

import glob
import json

import datasets
import pytest

from conftest import chat_rows, demo_rows, write_jsonl_gz
from moedpo.data import DataError, build_data
from moedpo.data.formats import parse_row
from moedpo.data.pairs import RowError


def truncate(path: str) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def data_of(make_cfg, tokenizer, *overrides):
    return build_data(make_cfg("+experiment=demo", *overrides), tokenizer, 512)


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_truncated_parquet_is_one_line(make_cfg, tokenizer, tmp_path, streaming):
    folder = tmp_path / "pq"
    folder.mkdir()
    datasets.Dataset.from_list(demo_rows("train", 40)).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list(demo_rows("test", 8)).to_parquet(str(folder / "test.parquet"))
    truncate(str(folder / "train.parquet"))
    with pytest.raises(DataError, match=rf"{folder}\[train\]: cannot be read \(ArrowInvalid: "
                       ".*truncated or damaged") as err:
        data = data_of(make_cfg, tokenizer, f"datasets=[{folder}]",
                       f"data.streaming={streaming}")
        data.stream.take(4)  # streamed: the train files are read as training goes
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["arrow", "dataset_info"])
@pytest.mark.parametrize("streaming", ["false", "true"])
def test_damaged_save_to_disk_folder_is_one_line(make_cfg, tokenizer, tmp_path, damage,
                                                 streaming):
    folder = tmp_path / "disk"
    datasets.DatasetDict(train=datasets.Dataset.from_list(demo_rows("train", 40)),
                         test=datasets.Dataset.from_list(demo_rows("test", 8))
                         ).save_to_disk(str(folder))
    if damage == "arrow":
        truncate(glob.glob(str(folder / "train" / "*.arrow"))[0])
        wanted = r"cannot be read \(OSError: "
    else:
        (folder / "train" / "dataset_info.json").write_text("{not json")
        wanted = r"cannot be read \(JSONDecodeError: "
    with pytest.raises(DataError, match=rf"{folder}: {wanted}.*truncated or damaged"):
        data_of(make_cfg, tokenizer, f"datasets=[{folder}]", f"data.streaming={streaming}")


@pytest.mark.parametrize("value, reason", [
    ("not json", "field 'chat_template_kwargs' is text but not JSON"),
    (["enable_thinking"], "field 'chat_template_kwargs' is a list: give an object"),
    ('["a"]', "field 'chat_template_kwargs' is a list: give an object"),
])
def test_chat_template_kwargs_that_are_no_object_skip_the_row(value, reason):
    row = {**chat_rows("train", 1)[0], "chat_template_kwargs": value}
    with pytest.raises(RowError, match=reason):
        parse_row(row, "t:1")
    good = parse_row({**row, "chat_template_kwargs": '{"enable_thinking": false}'}, "t:2")
    assert good.template_kwargs == {"enable_thinking": False}


def test_a_weighted_source_with_no_usable_rows_is_named(make_cfg, tokenizer, tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder in (good, bad):
        folder.mkdir()
        write_jsonl_gz(folder / "test.jsonl.gz", demo_rows("test", 8))
    write_jsonl_gz(good / "train.jsonl.gz", demo_rows("train", 40))
    write_jsonl_gz(bad / "train.jsonl.gz", [{"prompt": "p", "chosen": "", "rejected": " x"}] * 5)
    with pytest.raises(DataError, match=rf"data.weights: the source {bad} has no usable "
                       "training pairs but weight 0.5; skipped 5 rows"):
        data_of(make_cfg, tokenizer, f"datasets=[{good},{bad}]", "data.weights=[0.5,0.5]")


def test_a_one_line_array_skips_only_its_bad_item(make_cfg, tokenizer, tmp_path):
    folder = tmp_path / "arr"
    folder.mkdir()
    rows = demo_rows("train", 30)
    (folder / "train.json").write_text(json.dumps([*rows[:10], "not a row", *rows[10:]]))
    write_jsonl_gz(folder / "test.jsonl.gz", demo_rows("test", 8))
    data = data_of(make_cfg, tokenizer, f"datasets=[{folder}]")
    assert len(data.train) == 30
    assert data.skipped.total == 1 and "train.json[10]" in data.skipped.examples[0]


def test_an_empty_train_file_says_so(make_cfg, tokenizer, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    write_jsonl_gz(folder / "train.jsonl.gz", [])
    write_jsonl_gz(folder / "test.jsonl.gz", demo_rows("test", 8))
    with pytest.raises(DataError, match="0 usable training pairs.*the train split is empty"):
        data_of(make_cfg, tokenizer, f"datasets=[{folder}]")


def test_a_missing_local_model_folder_is_not_called_a_hub_id(make_cfg, tmp_path):
    from moedpo.config import ConfigError
    from moedpo.validate import validate

    missing = tmp_path / "no-model"
    with pytest.raises(ConfigError, match=f"model.name_or_path={missing}: no such folder"):
        validate(make_cfg("+experiment=demo", "model.config_path=null",
                          f"model.name_or_path={missing}"))


def test_a_chat_template_with_a_syntax_error_is_reported_once(make_cfg, tokenizer, tmp_path):
    """Once, naming the template and the line, not as a skipped row for every row."""
    import copy

    template = tmp_path / "bad.jinja"
    template.write_text("{% for m in messages %}{{ m.content }\n{% endfor %}")
    with pytest.raises(DataError, match=rf"data.chat_template={template}: a Jinja syntax error "
                       "at line 1"):
        data_of(make_cfg, tokenizer, "datasets=[demo_chat]", f"data.chat_template={template}")
    own = copy.deepcopy(tokenizer)  # the tokenizer's own template broken: also once
    own.chat_template = template.read_text()
    with pytest.raises(DataError, match="the chat template of the tokenizer .* has a Jinja "
                       "syntax error at line 1"):
        data_of(make_cfg, own, "datasets=[demo_chat]")


def test_a_response_in_the_user_role_skips_the_row():
    row = chat_rows("train", 1)[0]
    prompt = [{"role": "user", "content": "hi"}]
    for which in ("chosen", "rejected"):
        bad = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "a"}],
               "rejected": [{"role": "assistant", "content": "b"}]}
        bad[which] = [{"role": "user", "content": "a question back"}]
        with pytest.raises(RowError, match=f"the {which} response is in the user role"):
            parse_row(bad, "t:1")
    parse_row(row, "t:2")  # the bundled rows are fine
