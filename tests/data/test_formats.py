"""Row formats: detection on the documented example rows, prompt extraction, renames and the
errors a user sees for rows that fit no format."""

import json

import pytest

from conftest import write_jsonl_gz
from moedpo.data.formats import FORMATS, detect, parse_row, renamed, split_conversation
from moedpo.data.pairs import DataError, RowError, SkipLog
from moedpo.data.sources import load_pairs

U = {"role": "user", "content": "2+2?"}
A4, A5 = {"role": "assistant", "content": "4."}, {"role": "assistant", "content": "5."}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_each_documented_example_row_is_detected_as_its_format(kind):
    assert detect(json.loads(FORMATS[kind])) == kind


@pytest.mark.parametrize("kind", [k for k in FORMATS if k != "unpaired"])
def test_every_paired_format_gives_the_same_dialogue(kind):
    pair = parse_row(json.loads(FORMATS[kind]), "x:1")
    assert pair.format == kind
    if kind.startswith("conversational"):
        assert (pair.prompt, pair.chosen, pair.rejected) == ([U], [A4], [A5])
    else:
        assert (pair.prompt, pair.chosen, pair.rejected) == (
            "\n\nHuman: 2+2?\n\nAssistant:", " 4.", " 5.")


def test_implicit_prompt_is_the_longest_common_leading_run_of_messages():
    first = [{"role": "system", "content": "Be brief."}, U, A4, {"role": "user", "content": "x2?"}]
    prompt, chosen, rejected = split_conversation(first + [{"role": "assistant", "content": "8."}],
                                                  first + [A5])
    assert prompt == first and chosen == [{"role": "assistant", "content": "8."}] and \
        rejected == [A5]
    with pytest.raises(RowError, match="same conversation"):
        split_conversation([U, A4], [U, A4])
    with pytest.raises(RowError, match="share no leading message"):
        parse_row({"chosen": [A4], "rejected": [A5]}, "x")


def test_text_prompt_beside_conversations_is_ignored_as_trl_does():
    # UltraFeedback binarized: "prompt" is the user's text, chosen/rejected hold the chat.
    pair = parse_row({"prompt": "2+2?", "chosen": [U, A4], "rejected": [U, A5]}, "x")
    assert pair.format == "conversational-implicit" and pair.prompt == [U]


def test_template_kwargs_from_the_row():
    row = {"prompt": [U], "chosen": [A4], "rejected": [A5], "tools": '[{"name": "add"}]',
           "chat_template_kwargs": {"enable_thinking": False}}
    assert parse_row(row, "x").template_kwargs == {"enable_thinking": False,
                                                   "tools": [{"name": "add"}]}
    with pytest.raises(RowError, match="'tools' is text but not JSON"):
        parse_row({**row, "tools": "[oops"}, "x")


def test_columns_are_renamed_before_detection():
    row = {"question": "2+2?", "good": " 4.", "bad": " 5.", "id": 7}
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert renamed(row, cols) == {"id": 7, "prompt": "2+2?", "chosen": " 4.", "rejected": " 5."}
    assert parse_row(row, "x", cols).format == "standard-explicit"
    with pytest.raises(RowError, match=r"data.columns names \['bad'\], not in the row"):
        renamed({"question": "q", "good": "a"}, cols)


def test_mixed_text_and_messages_is_a_row_error():
    with pytest.raises(RowError, match="'prompt' is a list of messages while the others are "
                                       "text"):
        parse_row({"prompt": [U], "chosen": " 4.", "rejected": " 5."}, "x")


def test_unknown_row_shape_stops_the_run_naming_keys_and_formats(tmp_path):
    write_jsonl_gz(tmp_path / "train.jsonl.gz", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"train.jsonl.gz:1: not a preference row: keys "
                                        r"\['answer', 'question'\]; accepted: prompt/chosen/"
                                        r"rejected .*data.columns="):
        load_pairs(str(tmp_path), "train", {}, SkipLog())


def test_a_later_row_of_another_shape_is_skipped_not_fatal(tmp_path):
    good = json.loads(FORMATS["conversational-explicit"])
    write_jsonl_gz(tmp_path / "train.jsonl.gz", [good, {"oops": 1}, good])
    log = SkipLog()
    assert len(load_pairs(str(tmp_path), "train", {}, log)) == 2
    assert log.total == 1 and "train.jsonl.gz:2: not a preference row" in log.examples[0]


def test_the_documented_unpaired_row_reads_as_a_labeled_completion(tmp_path):
    write_jsonl_gz(tmp_path / "train.jsonl.gz", [json.loads(FORMATS["unpaired"])])
    (pair,) = load_pairs(str(tmp_path), "train", {}, SkipLog())
    assert (pair.prompt, pair.chosen, pair.label) == ("2+2?", " 4.", True)
