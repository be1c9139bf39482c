"""Tokenisation and truncation of preference pairs.

TRL's rule, so that ids (and results) are comparable: the prompt is tokenised alone and
together with each response (conversational pairs: both rendered by the chat template,
`templates.py`; standard pairs: as written (a response keeps its leading space: on byte-level
BPE tokenizers " Sure" is one token, "Sure" after a stripped boundary is two others); the
response's ids are what follows the longest run of ids the prompt alone and prompt+response
share (a merge across the boundary moves the split into the prompt). The tokenizer's BOS
starts a standard prompt where it adds one by default (Llama, Mistral, Mixtral;
`data.add_bos`), and EOS ends each standard response unless already last; a chat template
writes its own BOS and turn ends. If prompt + longer response exceeds
`max_length`, the prompt keeps `max_prompt_length` tokens (its end with `keep_end`, after its
BOS, which stays; its start with `keep_start`); if still too long, both responses are cut to
`max_length - max_prompt_length`. Labels (built in the collator) are the ids with prompt
positions masked.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .pairs import Pair, RowError, SkipLog
from .templates import render

TOKENIZE_BATCH = 1024


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids are kept as int32 arrays (given as any sequence of ints): 4 bytes a token,
    where a list of Python ints takes 36. The data set lives in every process for the whole
    run: the bundled demo set (60 tokens a pair) went from 37 to 16 bytes a token with the
    pairs' own overhead; HH's 160k pairs at ~300 tokens hold ~0.25 GB instead of ~1.8 GB."""

    prompt: Sequence[int]
    chosen: Sequence[int]  # response tokens only
    rejected: Sequence[int]
    # (chosen, rejected) summed reference log-probs, when precomputed (moedpo.reference)
    reference: tuple[float, float] | None = None
    # Unpaired rows (KTO): chosen is the completion, rejected another row's (the KL
    # estimate's mismatched completion, data/unpaired.py); True = desirable.
    label: bool | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "chosen", "rejected"):
            ids = getattr(self, name)
            if not isinstance(ids, array):
                object.__setattr__(self, name, array("i", ids))

    @property
    def length(self) -> int:
        """Length of the longer of the two full sequences."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens of the two sequences together."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class TokenizeStats:
    """Pairs cut by each truncation rule ("prompt", "responses"), token lengths before any
    cut, pairs whose prompt ids are not a prefix of prompt+response's (`boundary`, the first
    one kept as `boundary_example`) and pairs with identical responses (`identical`)."""

    counts: Counter = field(default_factory=Counter)
    boundary: int = 0
    boundary_example: str = ""
    identical: int = 0
    lengths: dict[str, list[int]] = field(
        default_factory=lambda: {"prompt": [], "chosen": [], "rejected": []})

    def merge(self, other: TokenizeStats) -> None:
        self.counts.update(other.counts)
        if other.boundary and not self.boundary:
            self.boundary_example = other.boundary_example
        self.boundary += other.boundary
        self.identical += other.identical
        for key, values in other.lengths.items():
            self.lengths[key] += values


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             max_prompt_length: int, mode: str = "keep_end",
             stats: TokenizeStats | None = None, lead: int = 0
             ) -> tuple[list[int], list[int], list[int]]:
    """`lead`: how many leading prompt ids (a BOS) stay whatever is cut: `keep_end` cuts the
    body after them, and they count in `max_prompt_length` (TRL cuts the BOS away with the
    rest, so every truncated prompt of a BOS tokenizer started mid-text)."""
    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        if len(prompt) > max_prompt_length:
            keep_end = mode == "keep_end"
            lead = min(lead, max_prompt_length)
            # Not prompt[-n:]: at 0 that keeps the whole prompt.
            prompt = (prompt[:lead] + prompt[len(prompt) - (max_prompt_length - lead):]
                      if keep_end else prompt[:max_prompt_length])
            if stats is not None:
                stats.counts["prompt"] += 1
        if len(prompt) + max(len(chosen), len(rejected)) > max_length:
            budget = max_length - max_prompt_length
            chosen, rejected = chosen[:budget], rejected[:budget]
            if stats is not None:
                stats.counts["responses"] += 1
    return prompt, chosen, rejected


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def shared_length(prompt: list[int], full: list[int]) -> int:
    """How many leading ids `full` shares with `prompt` (all of them, almost always)."""
    if full[:len(prompt)] == prompt:  # one C-level comparison for the common case
        return len(prompt)
    n = 0
    for a, b in zip(prompt, full, strict=False):
        if a != b:
            break
        n += 1
    return n


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its BOS by default (what `tokenizer(text)`
    and so TRL and the model's pretraining do): Llama, Mistral and Mixtral do; GPT-NeoX,
    GPT-2 and Qwen, which define no BOS or do not add it, do not."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def tokenize_pairs(pairs: list[Pair], tokenizer, max_length: int, max_prompt_length: int,
                   truncation_mode: str, log: SkipLog, stats: TokenizeStats | None = None,
                   add_bos: bool = False, skip_identical: bool = False) -> list[TokenizedPair]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one (responses end with EOS)")
    stats = stats if stats is not None else TokenizeStats()
    bos = [tokenizer.bos_token_id] if add_bos else []
    out = []
    for start in range(0, len(pairs), TOKENIZE_BATCH):
        chunk, texts = [], []
        for pair in pairs[start:start + TOKENIZE_BATCH]:
            try:
                texts.append(render(pair, tokenizer))
            except RowError as err:
                log.skip(pair.origin, str(err))
                continue
            chunk.append(pair)
        # Batched calls: the fast tokenizer parallelises a list in Rust.
        prompts, chosen, rejected = (
            tokenizer([t[i] for t in texts], add_special_tokens=False)["input_ids"]
            if texts else [] for i in range(3))
        for pair, p, pc, pr in zip(chunk, prompts, chosen, rejected, strict=True):
            n = min(shared_length(p, pc), shared_length(p, pr))
            if n < len(p):
                if not stats.boundary:
                    stats.boundary_example = f"{pair.origin}: {tokenizer.decode(p[n:])!r}"
                stats.boundary += 1
            if pair.conversational:  # the template wrote BOS and the turn's end
                p, c, r = p[:n], pc[n:], pr[n:]
            else:
                p, c, r = bos + p[:n], _with_eos(pc[n:], eos), _with_eos(pr[n:], eos)
            for key, values in (("prompt", p), ("chosen", c), ("rejected", r)):
                stats.lengths[key].append(len(values))
            # A BOS (ours, or the chat template's) starts the prompt however it is cut.
            lead = int(bool(p) and p[0] == tokenizer.bos_token_id and (
                bool(bos) or pair.conversational))
            p, c, r = truncate(p, c, r, max_length, max_prompt_length, truncation_mode, stats,
                               lead)
            if not c or not r:
                log.skip(pair.origin, "no response tokens left after truncation")
                continue
            if pair.label is not None:  # unpaired: its KL completion is chosen later
                out.append(TokenizedPair(p, c, c, label=pair.label))
                continue
            if c == r:
                stats.identical += 1
                if skip_identical:
                    log.skip(pair.origin, "identical chosen and rejected responses "
                                          "(data.skip_identical=true)")
                    continue
            out.append(TokenizedPair(p, c, r))
    return out


def _tokenize_chunk(args: tuple) -> tuple[list[TokenizedPair], SkipLog, TokenizeStats]:
    pairs, tokenizer, strict, settings = args
    log, stats = SkipLog(strict=strict), TokenizeStats()
    return tokenize_pairs(pairs, tokenizer, *settings[:3], log, stats, *settings[3:]), log, stats


def tokenize_parallel(pairs: list[Pair], tokenizer, num_proc: int, log: SkipLog,
                      stats: TokenizeStats, *settings) -> list[TokenizedPair]:
    """`tokenize_pairs` over `num_proc` worker processes (`num_proc`): chat templates render
    in Python, one core each. Same pairs, in the same order, as one process gives."""
    if num_proc <= 1 or len(pairs) < 4 * TOKENIZE_BATCH:
        return tokenize_pairs(pairs, tokenizer, *settings[:3], log, stats, *settings[3:])
    import multiprocessing

    size = -(-len(pairs) // (num_proc * 4))  # a few chunks a worker: even when rows differ
    chunks = [(pairs[i:i + size], tokenizer, log.strict, settings)
              for i in range(0, len(pairs), size)]
    # fork: the workers start at once with the tokenizer and modules already loaded.
    with multiprocessing.get_context("fork").Pool(num_proc) as pool:
        out = []
        for part, part_log, part_stats in pool.imap(_tokenize_chunk, chunks):
            out += part
            log.merge(part_log)
            stats.merge(part_stats)
    return out
