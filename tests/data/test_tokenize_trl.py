"""Token ids against TRL 1.16's DPOTrainer preprocessing of the same rows, on the tokenizer
families users bring: the response keeps its leading space, the split between prompt and
response follows TRL's rule, and the BOS is there where the tokenizer adds one."""

import types

import pytest

from conftest import demo_rows
from moedpo.data import bos_wanted
from moedpo.data.sources import Pair, SkipLog, parse_hh
from moedpo.data.tokenize import TokenizeStats, tokenize_pairs

trl = pytest.importorskip("trl")


def trl_ids(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int], list[int]]]:
    """TRL's own `_prepare_dataset` (prompt extraction, EOS, tokenisation) on `rows`."""
    import datasets

    args = trl.DPOConfig(output_dir="unused", max_length=None, report_to=[], bf16=False,
                         use_cpu=True)
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    out = trl.DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows),
                                          tokenizer, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]


def moedpo_ids(tokenizer, pairs: list[Pair], stats=None):
    out = tokenize_pairs(pairs, tokenizer, 4096, 2048, "keep_end", SkipLog(), stats,
                         add_bos=bos_wanted("auto", tokenizer))
    return [(list(p.prompt), list(p.chosen), list(p.rejected)) for p in out]


@pytest.mark.parametrize("kind", ["bytelevel", "bytelevel-bos", "sentencepiece-bos"])
def test_hh_rows_tokenise_as_trl_does(tokenizer_kinds, kind):
    tokenizer = tokenizer_kinds[kind]
    pairs = [Pair(*parse_hh(row), f"demo:{i}") for i, row in enumerate(demo_rows("train", 32))]
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    ours, theirs = moedpo_ids(tokenizer, pairs), trl_ids(tokenizer, rows)
    assert sum(a == b for a, b in zip(ours, theirs, strict=True)) == 32
    starts_with_bos = [ids[0] == tokenizer.bos_token_id for ids, _, _ in ours]
    assert all(starts_with_bos) == (kind != "bytelevel") and any(starts_with_bos) == all(
        starts_with_bos)


def test_response_keeps_its_leading_space_on_byte_level_bpe(tokenizer):
    (pair,) = moedpo_ids(tokenizer, [Pair("\n\nHuman: hi\n\nAssistant:", " Sure", " No", "t")])
    # " Sure" as the model saw it in pretraining text, not "Sure" after a stripped boundary.
    assert pair[1][:-1] == tokenizer(" Sure", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(pair[0] + pair[1][:-1]) == "\n\nHuman: hi\n\nAssistant: Sure"


def test_merge_across_the_boundary_moves_the_split_into_the_prompt(tokenizer):
    # "...Pa" + "ris": the prompt's last token merges with the response's first one.
    prompt, chosen = "The capital is Pa", "ris."
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joint = tokenizer(prompt + chosen, add_special_tokens=False)["input_ids"]
    assert joint[:len(alone)] != alone  # the case under test really happens
    stats = TokenizeStats()
    ((p, c, _),) = moedpo_ids(tokenizer, [Pair(prompt, chosen, " ran", "f:1")], stats)
    assert p + c[:-1] == joint  # the joint text's ids, split where they diverge
    assert stats.boundary == 1 and stats.boundary_example.startswith("f:1: ")
    ((tp, tc, _),) = trl_ids(tokenizer, [{"prompt": prompt, "chosen": chosen,
                                          "rejected": " ran"}])
    assert (p, c) == (tp, tc)


def test_hh_prompt_extraction_matches_trl_where_responses_differ_at_once():
    rows = [r for r in demo_rows("train", 200)
            if parse_hh(r)[1][:2] != parse_hh(r)[2][:2]][:20]
    assert len(rows) == 20
    for row in rows:
        theirs = trl.data_utils.extract_prompt(row)
        assert parse_hh(row) == (theirs["prompt"], theirs["chosen"], theirs["rejected"])


def test_add_bos_settings(tokenizer_kinds):
    from moedpo.data import DataError

    assert not bos_wanted("auto", tokenizer_kinds["bytelevel"])
    assert bos_wanted("auto", tokenizer_kinds["sentencepiece-bos"])
    assert not bos_wanted("false", tokenizer_kinds["sentencepiece-bos"])
    assert bos_wanted("true", tokenizer_kinds["bytelevel"])  # it defines one (EOS's token)
    no_bos = tokenizer_kinds["bytelevel"].__class__.from_pretrained(
        tokenizer_kinds["bytelevel"].name_or_path, bos_token=None)
    with pytest.raises(DataError, match="data.add_bos=true: the tokenizer defines no"):
        bos_wanted("true", no_bos)
