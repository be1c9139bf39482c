"""Unpaired rows (prompt, completion, label): parsed in text and messages, tokenised and
cached with their labels, each given another row's completion for KTO's KL estimate."""

import pytest

from conftest import tiny_train_overrides, write_unpaired
from moedpo.config import ConfigError
from moedpo.data import build_data
from moedpo.data.formats import parse_row
from moedpo.data.pairs import DataError, RowError
from moedpo.validate import check_rows_fit_losses


def test_text_and_message_rows_parse_with_their_label():
    text = parse_row({"prompt": "Q: 2+2?", "completion": " 4.", "label": True}, "f:1")
    assert (text.prompt, text.chosen, text.label, text.format) == ("Q: 2+2?", " 4.", True,
                                                                   "unpaired")
    chat = parse_row({"prompt": [{"role": "user", "content": "2+2?"}],
                      "completion": [{"role": "assistant", "content": "5."}], "label": 0},
                     "f:2")
    assert chat.conversational and chat.label is False and chat.chosen == chat.rejected


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "completion": " A", "label": "yes"}, "field 'label' is 'yes'"),
    ({"prompt": "Q", "completion": "  ", "label": True}, "empty completion response")])
def test_bad_unpaired_rows_say_why(row, message):
    with pytest.raises(RowError, match=message):
        parse_row(row, "f:3")


@pytest.mark.parametrize("chat", [False, True], ids=["text", "messages"])
def test_each_row_gets_another_rows_completion_and_keeps_its_label(make_cfg, tokenizer,
                                                                   tmp_path, chat):
    folder = write_unpaired(tmp_path / "rows", 20, 6, chat=chat)
    cfg = make_cfg(*tiny_train_overrides(), f"datasets=[{folder}]", "dry_run=false",
                   "loss.name=kto")
    data = build_data(cfg, tokenizer, vocab_size=len(tokenizer))
    assert data.unpaired and len(data.train) == 40
    assert [p.label for p in data.train] == [True, False] * 20  # the file's order
    own = [bytes(p.chosen) for p in data.train]
    kl = [bytes(p.rejected) for p in data.train]
    assert sorted(kl) == sorted(own)  # a permutation of the completions...
    assert sum(a == b for a, b in zip(own, kl, strict=True)) <= 2  # ...rarely a row's own
    again = build_data(cfg, tokenizer, vocab_size=len(tokenizer))  # from the cache
    assert [(bytes(p.chosen), bytes(p.rejected), p.label) for p in again.train] == \
        list(zip(own, kl, [p.label for p in data.train], strict=True))


def test_pairs_and_unpaired_rows_do_not_mix(make_cfg, tokenizer, tmp_path):
    folder = write_unpaired(tmp_path / "rows", 20, 6)
    cfg = make_cfg(*tiny_train_overrides(), f"datasets=[{folder},demo]", "dry_run=false")
    with pytest.raises(DataError, match="both preference pairs and unpaired rows"):
        build_data(cfg, tokenizer, vocab_size=len(tokenizer))


def test_rows_must_fit_the_loss(make_cfg):
    with pytest.raises(ConfigError, match="holds unpaired rows .* set loss.name=kto"):
        check_rows_fit_losses(make_cfg("loss.name=sigmoid"), unpaired=True)
    with pytest.raises(ConfigError, match="loss.name=kto reads unpaired rows"):
        check_rows_fit_losses(make_cfg("loss.name=kto"), unpaired=False)
