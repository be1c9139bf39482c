"""Truncation rules against hand-worked examples (ids are symbolic integers)."""

from array import array
from dataclasses import replace

from moedpo.data.sources import Pair, SkipLog
from moedpo.data.tokenize import TokenizedPair, TokenizeStats, tokenize_pairs, truncate

P = list(range(100, 110))  # 10 prompt tokens
C = [1, 2, 3, 4, 5, 6]  # chosen, 6 tokens
R = [7, 8, 9]  # rejected, 3 tokens


def test_no_truncation_when_it_fits():
    assert truncate(P, C, R, max_length=16, max_prompt_length=4) == (P, C, R)


def test_keep_end_prompt_truncation_is_enough():
    # 10 + 6 > 14: the prompt keeps its last 8 tokens; 8 + 6 = 14 fits, responses untouched.
    p, c, r = truncate(P, C, R, max_length=14, max_prompt_length=8, mode="keep_end")
    assert p == P[-8:] and c == C and r == R


def test_keep_end_keeps_the_bos_and_counts_it():
    # BOS 1 then 9 body tokens; 8 kept: the BOS and the body's last 7 (TRL: the last 8).
    prompt = [1, *P[1:]]
    p, c, r = truncate(prompt, C, R, max_length=14, max_prompt_length=8, lead=1)
    assert p == [1, *P[-7:]] and len(p) == 8 and (c, r) == (C, R)
    assert truncate(prompt, C, R, 14, 8, "keep_start", lead=1)[0] == prompt[:8]
    assert truncate(prompt, C, R, 6, 0, lead=1)[0] == []  # no prompt budget at all


def test_truncated_prompts_start_with_bos_on_bos_tokenizers(tokenizer_kinds):
    """keep_end on a tokenizer that adds BOS (Llama, Mistral, Mixtral): every prompt, cut or
    not, starts with BOS; a chat template's BOS stays the same way."""
    from moedpo.data import bos_wanted

    tokenizer = tokenizer_kinds["sentencepiece-bos"]
    long_prompt = "\n\nHuman: " + " ".join(f"word{i}" for i in range(80)) + "\n\nAssistant:"
    pairs = [Pair(long_prompt, " Sure thing.", " No.", "t:0"),
             Pair("\n\nHuman: hi\n\nAssistant:", " Sure.", " No.", "t:1")]
    out = tokenize_pairs(pairs, tokenizer, 48, 16, "keep_end", SkipLog(),
                         add_bos=bos_wanted("auto", tokenizer))
    assert len(out[0].prompt) == 16 and len(out[1].prompt) < 16
    assert all(p.prompt[0] == tokenizer.bos_token_id for p in out)
    full = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert list(out[0].prompt[1:]) == full[-15:]  # the body's end, after the BOS


def test_keep_start_prompt_truncation():
    p, _, _ = truncate(P, C, R, max_length=14, max_prompt_length=8, mode="keep_start")
    assert p == P[:8]


def test_responses_cut_to_budget_after_prompt():
    # 10 + 6 > 9: prompt -> last 5; 5 + 6 > 9 still: both responses cut to 9 - 5 = 4.
    stats = TokenizeStats()
    p, c, r = truncate(P, C, R, max_length=9, max_prompt_length=5, stats=stats)
    assert (p, c, r) == (P[-5:], C[:4], R)
    assert stats.counts == {"prompt": 1, "responses": 1}


def test_short_prompt_long_responses():
    # The prompt is already within max_prompt_length; the responses still get cut.
    p, c, r = truncate(P[:3], C, R, max_length=7, max_prompt_length=4)
    assert (p, c, r) == (P[:3], C[:3], R)


def test_tokenize_appends_eos_once_and_excludes_special_tokens(tokenizer):
    eos = tokenizer.eos_token
    pairs = [Pair("\n\nHuman: hi\n\nAssistant:", "Hello!", "Bye" + eos, "t:1")]
    (out,) = tokenize_pairs(pairs, tokenizer, 64, 32, "keep_end", SkipLog())
    expect_prompt = tokenizer("\n\nHuman: hi\n\nAssistant:", add_special_tokens=False)["input_ids"]
    assert list(out.prompt) == expect_prompt
    assert list(out.chosen) == tokenizer("Hello!")["input_ids"] + [tokenizer.eos_token_id]
    assert out.rejected.count(tokenizer.eos_token_id) == 1
    assert out.rejected[-1] == tokenizer.eos_token_id


def test_token_ids_are_stored_as_int32_arrays():
    """4 bytes a token: the tokenised data set stays in memory for the whole run."""
    pair = TokenizedPair([5, 70000, 3], (9,), range(4))
    for ids, expected in ((pair.prompt, [5, 70000, 3]), (pair.chosen, [9]),
                          (pair.rejected, [0, 1, 2, 3])):
        assert isinstance(ids, array) and ids.itemsize == 4 and list(ids) == expected
    assert pair.length == 7 and pair.n_tokens == 11
    assert list(replace(pair, reference=(1.0, 2.0)).prompt) == [5, 70000, 3]


def test_long_rows_are_truncated_to_max_length(tokenizer):
    pairs = [Pair("\n\nHuman: " + "word " * 200 + "\n\nAssistant:", "yes " * 100, "no", "t:1")]
    (out,) = tokenize_pairs(pairs, tokenizer, 48, 16, "keep_end", SkipLog())
    assert len(out.prompt) == 16 and len(out.chosen) == 32 and out.length == 48


def test_max_prompt_length_zero_drops_the_prompt():
    # prompt[-0:] would keep all 10 prompt tokens and exceed max_length.
    p, c, r = truncate(P, C, R, max_length=6, max_prompt_length=0)
    assert (p, c, r) == ([], C, R)
    p, _, _ = truncate(P, C, R, max_length=6, max_prompt_length=0, mode="keep_start")
    assert p == []


def test_identical_responses_are_counted_and_can_be_skipped(tokenizer):
    prompt = "Q:"
    shared = len(tokenizer(prompt + " a long", add_special_tokens=False)["input_ids"])
    pairs = [Pair(prompt, " same", " same", "t:1"),
             Pair(prompt, " a long answer", " a long other", "t:2"),
             Pair(prompt, " yes", " no", "t:3")]
    stats, log = TokenizeStats(), SkipLog()
    # Responses cut to what follows the prompt in "Q: a long": the second pair's become equal.
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    kept = tokenize_pairs(pairs, tokenizer, shared, n_prompt, "keep_end", log, stats)
    assert len(kept) == 3 and stats.identical == 2
    assert list(kept[1].chosen) == list(kept[1].rejected)
    kept = tokenize_pairs(pairs, tokenizer, shared, n_prompt, "keep_end", log, TokenizeStats(),
                          skip_identical=True)
    assert [list(p.rejected) for p in kept] == [
        tokenizer(" no", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert log.counts == {"identical chosen and rejected responses "
                          "(data.skip_identical=true)": 2}
