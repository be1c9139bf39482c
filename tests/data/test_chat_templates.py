"""Conversational rows through the chat template: the same prompt and response ids as TRL
1.16's DPOTrainer preprocessing of the same rows (pinned in fixtures/trl_chat_ids.json by
`python tests/data/pin_trl_chat_ids.py`, and live where TRL is installed), on the tokenizer
families users bring, each with a template in its family's style."""

import json

import pytest

from chat_cases import FIXTURE, chat_groups, trl_chat_ids
from moedpo.data.formats import parse_row
from moedpo.data.pairs import DataError, SkipLog
from moedpo.data.templates import load_chat_template, use_chat_template
from moedpo.data.tokenize import TokenizeStats, tokenize_pairs

KINDS = ["bytelevel", "bytelevel-bos", "sentencepiece-bos", "chatml"]


def moedpo_chat_ids(tokenizer, rows, stats=None, log=None):
    pairs = [parse_row(r, f"row:{i}") for i, r in enumerate(rows)]
    # add_bos=True would add a second BOS to templates that write one; it must be ignored.
    out = tokenize_pairs(pairs, tokenizer, 4096, 2048, "keep_end", log or SkipLog(), stats,
                         add_bos=True)
    return [[list(p.prompt), list(p.chosen), list(p.rejected)] for p in out]


@pytest.mark.parametrize("kind", KINDS)
def test_conversational_ids_equal_pinned_trl_output(tokenizer_kinds, kind):
    pinned = json.loads(FIXTURE.read_text())["ids"][kind]
    for group, rows in chat_groups(kind).items():
        stats = TokenizeStats()
        ours = moedpo_chat_ids(tokenizer_kinds[kind], rows, stats)
        assert ours == pinned[group], (kind, group)
        # Only the thinking template renders the prompt otherwise than inside the chat.
        assert (stats.boundary > 0) == (group == "thinking"), (kind, group)


@pytest.mark.parametrize("kind", KINDS)
def test_conversational_ids_equal_live_trl(tokenizer_kinds, kind):
    pytest.importorskip("trl")
    tokenizer = tokenizer_kinds[kind]
    for group, rows in chat_groups(kind).items():
        assert moedpo_chat_ids(tokenizer, rows) == trl_chat_ids(tokenizer, rows), (kind, group)


def test_template_writes_bos_once_and_ends_turns_without_extra_eos(tokenizer_kinds):
    tok = tokenizer_kinds["bytelevel-bos"]
    ((p, c, r),) = moedpo_chat_ids(tok, chat_groups("bytelevel-bos")["explicit"][:1])
    assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert c[-1] == r[-1] == eot and tok.eos_token_id not in c + r
    text = tok.decode(p + c)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n"
                         "Gladly. 4 + 1 = 5.<|eot_id|>")


def test_tools_reach_the_template(tokenizer_kinds):
    tok = tokenizer_kinds["chatml"]
    groups = chat_groups("chatml")
    (with_tools,), (plain,) = (moedpo_chat_ids(tok, groups[g][:1]) for g in ("tools", "explicit"))
    assert '"name": "add"' in tok.decode(with_tools[0]) and "Tools" not in tok.decode(plain[0])
    assert with_tools[1:] == plain[1:]  # same responses


def test_no_template_is_a_clear_error(tokenizer_kinds):
    bare = tokenizer_kinds["bytelevel"]
    saved, bare.chat_template = bare.chat_template, None
    try:
        with pytest.raises(DataError, match=r"row:0: a conversational row \(messages\), but the "
                           r"tokenizer \(.*\) has no chat template; set data.chat_template"):
            moedpo_chat_ids(bare, chat_groups("bytelevel")["explicit"][:1])
    finally:
        bare.chat_template = saved


def test_a_template_that_fails_on_a_row_skips_that_row(tokenizer_kinds):
    tok = tokenizer_kinds["bytelevel"]  # raises on roles it does not know
    rows = chat_groups("bytelevel")["explicit"][:3]
    rows[1] = {**rows[1], "prompt": [{"role": "tool", "content": "42"}]}
    log = SkipLog()
    assert len(moedpo_chat_ids(tok, rows, log=log)) == 2
    assert "row:1: the chat template failed on this row" in log.examples[0]
    assert "unknown role: tool" in log.examples[0]


def test_chat_template_override_from_a_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    from transformers import AutoTokenizer

    from moedpo.models.load import EMBEDDED_TOKENIZER
    fresh = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    use_chat_template(fresh, str(path))
    ((p, c, _),) = moedpo_chat_ids(fresh, chat_groups("bytelevel")["explicit"][1:2])
    assert fresh.decode(p) == "<user>Any tips for staying fit?<assistant>"
    assert fresh.decode(p + c) == ("<user>Any tips for staying fit?<assistant>"
                                   "Sure! A brisk thirty minute walk every day is a "
                                   "great start.")
    (tmp_path / "plain.txt").write_text("no template here")
    with pytest.raises(DataError, match="plain.txt: not a Jinja template"):
        load_chat_template(str(tmp_path / "plain.txt"))
    with pytest.raises(DataError, match="missing.jinja: cannot read it"):
        load_chat_template(str(tmp_path / "missing.jinja"))
