import json

import pytest

from conftest import offline, write_jsonl_gz
from moedpo.data.sources import (
    DataError,
    RowError,
    SkipLog,
    load_pairs,
    parse_hh,
    parse_os,
    parse_shp,
)

HH_ROW = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: It is 4.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:  No idea. ",
}


def test_hh_prompt_is_shared_prefix_up_to_last_assistant():
    prompt, chosen, rejected = parse_hh(HH_ROW)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:"
    # As written, leading space kept (TRL's rule): " It" is one byte-level BPE token.
    assert (chosen, rejected) == (" It is 4.", "  No idea. ")


def test_hh_prompt_cut_inside_shared_text():
    # The shared prefix runs past "Assistant:" into the common word "It": the cut is at
    # the last Assistant marker, and both responses keep their own full text.
    row = {"chosen": "\n\nHuman: q\n\nAssistant: It is 4.",
           "rejected": "\n\nHuman: q\n\nAssistant: It is 5."}
    assert parse_hh(row) == ("\n\nHuman: q\n\nAssistant:", " It is 4.", " It is 5.")


@pytest.mark.parametrize("row, reason", [
    ({"chosen": "Human: hi", "rejected": "Human: ho"}, "no '\\n\\nAssistant:'"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: yes"}, "field 'rejected'"),
    ({"chosen": "\n\nHuman: q\n\nAssistant:   ", "rejected": "\n\nHuman: q\n\nAssistant: x"},
     "empty chosen response"),
])
def test_hh_bad_rows(row, reason):
    with pytest.raises(RowError, match=reason.replace("\\", "\\\\").replace("'", "'")):
        parse_hh(row)


def test_shp_row_format():
    row = {"history": "Why is the sky blue?", "human_ref_A": " Rayleigh scattering. ",
           "human_ref_B": "Magic.", "labels": 1, "score_A": 10, "score_B": 2}
    assert parse_shp(row) == ("\n\nHuman: Why is the sky blue?\n\nAssistant:",
                              " Rayleigh scattering. ", " Magic.")
    assert parse_shp({**row, "labels": 0})[1:] == (" Magic.", " Rayleigh scattering. ")


def test_os_row_formats():
    reddit = {"info": {"id": "x", "post": "My cat ran off.", "title": "Lost cat",
                       "subreddit": "pets", "article": None, "site": None},
              "summaries": [{"text": " cat lost ", "policy": "a"}, {"text": "dog", "policy": "b"}],
              "choice": 0, "batch": "batch3", "split": "train", "worker": "w"}
    prompt, chosen, rejected = parse_os(reddit)
    assert prompt == ("\n\nHuman: SUBREDDIT: r/pets\n\nTITLE: Lost cat\n\nPOST: My cat ran off."
                      "\n\nTL;DR:\n\nAssistant:")
    assert (chosen, rejected) == (" cat lost ", " dog")
    news = {**reddit, "batch": "cnndm0", "choice": 1,
            "info": {"article": "Rain today.", "post": None, "title": None, "subreddit": None}}
    assert parse_os(news) == ("\n\nHuman: Article:\nRain today.\n\nTL;DR:\n\nAssistant:",
                              " dog", " cat lost ")


def test_local_folder_skips_and_counts_bad_lines_with_locations(tmp_path):
    good = {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": "yes", "rejected": "no"}
    write_jsonl_gz(tmp_path / "train.jsonl.gz", [
        good, "{not json", "[1, 2]", {"prompt": "p", "chosen": "", "rejected": "x"}, HH_ROW])
    log = SkipLog()
    pairs = load_pairs(str(tmp_path), "train", {}, log)
    assert [p.chosen for p in pairs] == ["yes", " It is 4."]
    assert log.total == 3
    assert log.examples[0].startswith(f"{tmp_path}/train.jsonl.gz:2: malformed JSON")
    assert log.examples[1].endswith(":3: line is not a JSON object")
    assert "train.jsonl.gz:4: empty chosen response" in log.examples[2]


def test_strict_mode_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(HH_ROW) + "\n{oops\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: malformed JSON"):
        load_pairs(str(tmp_path), "train", {}, SkipLog(strict=True))


def test_dataset_dir_reads_hub_layout_and_validation_alias(tmp_path):
    row = {"info": {"post": "p", "title": "t", "subreddit": "s"}, "batch": "b1",
           "summaries": [{"text": "a"}, {"text": "b"}], "choice": 1}
    write_jsonl_gz(tmp_path / "validation.jsonl.gz", [row, row])
    pairs = load_pairs("os", "test", {"os": str(tmp_path)}, SkipLog())
    assert len(pairs) == 2 and pairs[0].chosen == " b"
    assert pairs[1].origin == f"{tmp_path}/validation.jsonl.gz:2"


def test_shp_per_domain_layout(tmp_path):
    row = {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 0}
    for domain in ("askscience", "askhistory"):
        (tmp_path / domain).mkdir()
        (tmp_path / domain / "train.json").write_text(json.dumps(row) + "\n")
    pairs = load_pairs("shp", "train", {"shp": str(tmp_path)}, SkipLog())
    assert [p.origin.split("/")[-2] for p in pairs] == ["askhistory", "askscience"]


def test_missing_split_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no test.jsonl"):
        load_pairs(str(tmp_path), "test", {}, SkipLog())


def test_hub_dataset_missing_offline_says_how_to_fix(monkeypatch, tmp_path):
    offline(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(DataError, match=r"Anthropic/hh-rlhf.*dataset_dir\.hh=DIR"):
        load_pairs("hh", "train", {}, SkipLog())


def test_hub_source_goes_through_datasets_with_the_hub_split(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        row = {"info": {"post": "p", "title": "t", "subreddit": "s"}, "batch": "b",
               "summaries": [{"text": "x"}, {"text": "y"}], "choice": 0}
        return datasets.Dataset.from_list([row, {**row, "choice": 7}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    log = SkipLog()
    pairs = load_pairs("os", "test", {"os": None}, log)
    assert calls == [("openai/summarize_from_feedback", "comparisons", "validation")]
    assert [p.chosen for p in pairs] == [" x"]
    assert pairs[0].origin == "openai/summarize_from_feedback[validation] row 0"
    assert log.examples == ["openai/summarize_from_feedback[validation] row 1: needs "
                            "'summaries' (two of them) and 'choice' (0 or 1)"]


def test_bytes_that_are_not_utf8_skip_their_line_only(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": " yes", "rejected": " no"}).encode()
    bad = b'{"prompt": "\xff\xfe"}'
    (tmp_path / "train.jsonl").write_bytes(b"\n".join([good, bad, good]) + b"\n")
    log = SkipLog()
    assert len(load_pairs(str(tmp_path), "train", {}, log)) == 2
    assert log.examples == [f"{tmp_path}/train.jsonl:2: not UTF-8 text (byte 0xff at column 13)"]


def test_gzip_is_read_by_its_bytes_not_its_name(tmp_path):
    import gzip

    row = {"prompt": "p", "chosen": " yes", "rejected": " no"}
    (tmp_path / "train.jsonl").write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))
    assert len(load_pairs(str(tmp_path), "train", {}, SkipLog())) == 1


def test_truncated_gzip_is_one_error_naming_the_file(tmp_path):
    import gzip

    row = json.dumps({"prompt": "p", "chosen": " yes", "rejected": " no"}) + "\n"
    data = gzip.compress((row * 2000).encode())
    (tmp_path / "train.jsonl.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"train\.jsonl\.gz: a broken gzip archive after line"):
        load_pairs(str(tmp_path), "train", {}, SkipLog())


def test_a_json_array_file_is_read_and_bad_items_are_named(tmp_path):
    rows = [{"prompt": "p", "chosen": " yes", "rejected": " no"},
            {"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user",
                                                                          "content": "ho"}],
             "prompt": "x"}]
    (tmp_path / "train.json").write_text(json.dumps(rows, indent=2))
    log = SkipLog()
    pairs = load_pairs(str(tmp_path), "train", {}, log)
    assert [p.origin for p in pairs] == [f"{tmp_path}/train.json[0]"]
    assert "train.json[1]: chosen and rejected share no leading message" in log.examples[0]


def test_when_every_row_is_skipped_the_error_says_why(make_cfg, tmp_path, tokenizer):
    from moedpo.data import build_data

    row = {"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user",
                                                                       "content": "r"}]}
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text((json.dumps(row) + "\n") * 3)
    cfg = make_cfg("use_synthetic_data=false", f"datasets=[{tmp_path}]",
                   "per_device_train_batch_size=2")
    with pytest.raises(DataError) as err:
        build_data(cfg, tokenizer, 512)
    message = str(err.value)
    assert "0 usable training pairs" in message and "skipped 6 rows" in message  # both splits
    assert "share no leading message" in message and "lower the batch size" not in message
