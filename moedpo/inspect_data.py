"""`moedpo data inspect KEY=VALUE ...`: the data report of a training config, without a model.

Token-length percentiles and a histogram of prompt, chosen and rejected (before truncation),
how many pairs each truncation rule cut, the rows skipped and why, and the first pairs as
the model will see them. Meant for choosing `max_length` before paying for accelerators.
"""

from __future__ import annotations

import numpy as np

from .config import DPOConfig
from .data import build_data
from .models.load import load_tokenizer
from .validate import validate

BAR = 40


def percentile_table(lengths: dict[str, list[int]]) -> list[str]:
    lines = [f"  {'':<24}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}"]
    for name, values in lengths.items():
        if values:
            p50, p90, p99 = np.percentile(values, [50, 90, 99])
            lines.append(f"  {name:<24}{p50:>7.0f}{p90:>7.0f}{p99:>7.0f}{max(values):>7}")
    return lines


def histogram(values: list[int], max_length: int, bins: int = 10) -> list[str]:
    top = max(max(values), max_length)
    counts, edges = np.histogram(values, bins=bins, range=(0, top))
    peak = max(counts.max(), 1)
    lines = []
    for count, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        mark = " <- max_length" if lo < max_length <= hi else ""
        lines.append(f"  {lo:>6.0f}-{hi:<6.0f} {'#' * round(BAR * count / peak):<{BAR}} "
                     f"{count}{mark}")
    return lines


def show_pair(tokenizer, pair) -> list[str]:
    """The two sequences as the model reads them (chat template rendered, special tokens
    shown), the trained response between ⟦ ⟧: what is prompt and what is response."""
    def text(ids) -> str:
        return tokenizer.decode(list(ids)).replace("\n", "\\n")
    prompt = text(pair.prompt)
    return [f"  [chosen]   {prompt}⟦{text(pair.chosen)}⟧",
            f"  [rejected] {prompt}⟦{text(pair.rejected)}⟧"]


def inspect(cfg: DPOConfig, n_examples: int = 3) -> str:
    cfg.use_synthetic_data = False  # a report of real data, whatever the config's default
    cfg.data.streaming = False  # the report reads the whole training split
    validate(cfg)
    tokenizer = load_tokenizer(cfg.model)
    data = build_data(cfg, tokenizer, vocab_size=len(tokenizer))
    stats, skipped = data.tokenized, data.skipped
    n_pairs = len(stats.lengths["prompt"])
    longer = [p + max(c, r) for p, c, r in zip(*stats.lengths.values(), strict=True)]
    lines = [f"data report: datasets={cfg.datasets} max_length={cfg.max_length} "
             f"max_prompt_length={cfg.max_prompt_length} truncation_mode={cfg.truncation_mode}"]
    for name, (n_train, n_eval) in data.sources.items():
        formats = ", ".join(f"{kind} ({n})" for kind, n in data.formats.get(name, {}).items())
        lines.append(f"  {name}: {n_train} train pairs, {n_eval} eval pairs; row format: "
                     f"{formats}")
    lines.append(f"skipped rows: {skipped.total}" + (f" {dict(skipped.counts)}; first: "
                 + "; ".join(skipped.examples) if skipped.total else ""))
    lines.append(f"token lengths before truncation ({n_pairs} pairs, train and eval):")
    lines += percentile_table({**stats.lengths, "prompt + longer response": longer})
    lines.append("prompt + longer response:")
    lines += histogram(longer, cfg.max_length)
    for rule, what in (("prompt", f"prompt cut to {cfg.max_prompt_length} tokens"),
                       ("responses", f"responses cut to "
                                     f"{cfg.max_length - cfg.max_prompt_length} tokens")):
        count = stats.counts.get(rule, 0)
        lines.append(f"truncated: {what}: {count} pairs ({100 * count / max(n_pairs, 1):.1f}%)")
    lines.append(f"identical responses: {stats.identical} pairs"
                 + (" (skipped)" if cfg.data.skip_identical else ""))
    if stats.boundary:
        lines.append(f"prompt ids not a prefix of prompt+response: {stats.boundary} pairs; "
                     f"first: {stats.boundary_example}")
    whole = int(np.percentile(longer, 99)) if longer else 0
    lines.append(f"max_length={whole} would keep 99% of pairs whole")
    lines.append(f"first {n_examples} training pairs as the model sees them (response in ⟦ ⟧):")
    for pair in data.train[:n_examples]:
        lines += show_pair(tokenizer, pair)
    return "\n".join(lines)
