"""Data: sources -> tokenised pairs -> step batches -> collated tensors."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DPOConfig
from . import cache, unpaired
from .collate import collate, collate_shared
from .loader import eval_indices, train_indices
from .sources import EVAL_ROWS_PER_DATASET, DataError, Pair, SkipLog, open_split, read_pairs
from .stream import PairStream
from .synthetic import synthetic_pairs
from .templates import use_chat_template
from .tokenize import TokenizedPair, TokenizeStats, adds_bos, tokenize_pairs, tokenize_parallel

__all__ = ["DataBundle", "DataError", "Pair", "TokenizedPair", "build_data", "collate",
           "collate_shared", "eval_indices", "train_indices"]

DRY_RUN_BATCHES = 10
log = logging.getLogger("moedpo")


@dataclass
class DataBundle:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    skipped: SkipLog = field(default_factory=SkipLog)
    tokenized: TokenizeStats = field(default_factory=TokenizeStats)
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (train, eval)
    formats: dict[str, Counter] = field(default_factory=dict)  # name -> row formats read
    stream: PairStream | None = None  # data.streaming: the training pairs, read as needed
    unpaired: bool = False  # rows (prompt, completion, label) for KTO-style losses

    def labels(self) -> list[str]:
        """Short names of the sources (a folder's or Hub id's last part), in order."""
        names = [name.rstrip("/").rsplit("/", 1)[-1] or name for name in self.sources]
        return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]

    def train_steps(self, cfg: DPOConfig, step_size: int, start_step: int = 0,
                    stream_state: dict | None = None) -> Iterator[list[TokenizedPair]]:
        """Each optimizer step's pairs from `start_step` on: drawn from the held pairs by
        `loader.train_indices`, or taken from the stream (restored to `stream_state`)."""
        if self.stream is not None:
            if stream_state is not None:
                self.stream.restore(stream_state)
            while True:
                yield self.stream.take(step_size)
        lengths = [pair.length for pair in self.train] if cfg.data.group_by_length else None
        for indices in train_indices(len(self.train), step_size, cfg.seed, cfg.shuffle,
                                     start_step, lengths, self.mixture(cfg.data.weights)):
            yield [self.train[i] for i in indices]

    def mixture(self, weights: list[float] | None) -> tuple[list[int], list[float]] | None:
        """(train pairs per source, weights) for the loader, with `data.weights` set."""
        if weights is None:
            return None
        return [n_train for n_train, _ in self.sources.values()], list(weights)

    def eval_labels(self) -> list[str]:
        """Each eval pair's source label (eval pairs are the sources' in order)."""
        return [label for label, (_, n_eval) in zip(self.labels(), self.sources.values(),
                                                    strict=True) for _ in range(n_eval)]


def bos_wanted(setting: str, tokenizer) -> bool:
    """`data.add_bos` (auto, true, false) for this tokenizer."""
    if setting == "auto":
        return adds_bos(tokenizer)
    if setting == "true" and tokenizer.bos_token_id is None:
        raise DataError("data.add_bos=true: the tokenizer defines no bos_token; set "
                        "data.add_bos=auto or false")
    return setting == "true"


def split_pairs(cfg: DPOConfig, name: str, split: str, tokenizer, bundle: DataBundle,
                add_bos: bool, settings: list | None, limit: int | None) -> list[TokenizedPair]:
    """The tokenised pairs of one split of a source, from the cache when it holds them
    (`settings`: what the ids depend on besides the data; None: not cached)."""
    skipped, stats = SkipLog(strict=cfg.data.strict), TokenizeStats()
    source, parse = open_split(name, split, cfg.dataset_dir, skipped, cfg.num_proc,
                               dict(cfg.data.splits), dict(cfg.data.columns or {}))
    folder = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else cache.default_dir()
    key = (cache.cache_key(settings, name, split, source.digest)
           if cfg.data.cache and settings is not None else None)
    hit = cache.load(folder, key, skipped, stats) if key else None
    if hit is not None:
        tokenized, formats = hit
    else:
        started = time.perf_counter()
        pairs = read_pairs(source, parse, skipped)
        if split == "test":
            pairs = pairs[:EVAL_ROWS_PER_DATASET]
        pairs = pairs[:limit] if limit is not None else pairs
        formats = Counter(p.format for p in pairs)
        tokenized = tokenize_parallel(pairs, tokenizer, cfg.num_proc, skipped, stats,
                                      cfg.max_length, cfg.max_prompt_length,
                                      cfg.truncation_mode, add_bos, cfg.data.skip_identical)
        if key:
            cache.save(folder, key, tokenized, skipped, stats, formats)
            log.info("data %s [%s]: %d pairs read and tokenised in %.1f s, cached in %s",
                     name, split, len(tokenized), time.perf_counter() - started, folder / key)
    bundle.skipped.merge(skipped)
    bundle.tokenized.merge(stats)
    bundle.formats.setdefault(name, Counter()).update(formats)
    return tokenized


def training_stream(cfg: DPOConfig, tokenizer, bundle: DataBundle,
                    add_bos: bool) -> PairStream:
    """data.streaming: the training splits chained, read and tokenised as steps need them."""
    def open_rows():
        for name in cfg.dataset_list:
            source, parse = open_split(name, "train", cfg.dataset_dir, bundle.skipped,
                                       cfg.num_proc, dict(cfg.data.splits),
                                       dict(cfg.data.columns or {}), streaming=True)
            for row, origin in source.rows:
                yield row, origin, parse

    def tokenize(pairs: list[Pair], skipped: SkipLog) -> list[TokenizedPair]:
        chunk = TokenizeStats()
        out = tokenize_pairs(pairs, tokenizer, cfg.max_length, cfg.max_prompt_length,
                             cfg.truncation_mode, skipped, chunk, add_bos,
                             cfg.data.skip_identical)
        # Counts only: a stream has no end, and three lengths a pair would grow without one.
        chunk.lengths = {key: [] for key in chunk.lengths}
        bundle.tokenized.merge(chunk)
        if any(p.label is not None for p in out):
            raise DataError(f"datasets={cfg.datasets}: unpaired rows (prompt, completion, "
                            "label) are not streamed (their KL completions come from the whole "
                            "split); set data.streaming=false")
        return out
    return PairStream(open_rows, tokenize, cfg.seed, cfg.data.shuffle_buffer if cfg.shuffle
                      else 1, bundle.skipped)


def unpaired_rows(cfg: DPOConfig, bundle: DataBundle) -> bool:
    """Whether the rows are unpaired (KTO); then each gets its KL completion. Refuses a mix
    of pairs and unpaired rows (no loss reads both)."""
    kind = unpaired.labeled(bundle.train + bundle.eval)
    if kind is None:
        raise DataError(f"datasets={cfg.datasets}: both preference pairs and unpaired rows "
                        "(prompt, completion, label); a run reads one kind: split them into "
                        "two runs")
    if kind:
        bundle.train = unpaired.with_kl_completions(bundle.train, cfg.seed, cfg.max_length,
                                                    "train split")
        bundle.eval = unpaired.with_kl_completions(bundle.eval, cfg.seed + 1, cfg.max_length,
                                                   "test split")
    return kind


def build_data(cfg: DPOConfig, tokenizer, vocab_size: int, world_size: int = 1) -> DataBundle:
    train_step = cfg.per_device_train_batch_size * world_size * cfg.gradient_accumulation_steps
    eval_step = cfg.eval_batch_size * world_size
    if cfg.use_synthetic_data:
        n_train = train_step * (DRY_RUN_BATCHES if cfg.dry_run else max(cfg.max_steps or 1, 1))
        return DataBundle(
            train=synthetic_pairs(n_train, cfg.max_length, vocab_size, cfg.seed),
            eval=synthetic_pairs(eval_step * 2, cfg.max_length, vocab_size, cfg.seed + 1),
            sources={"synthetic": (n_train, eval_step * 2)},
        )
    bundle = DataBundle(train=[], eval=[], skipped=SkipLog(strict=cfg.data.strict))
    add_bos = bos_wanted(cfg.data.add_bos, tokenizer)
    use_chat_template(tokenizer, cfg.data.chat_template)
    tokenizer_key = cache.tokenizer_digest(tokenizer)
    settings = [tokenizer_key, cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode,
                add_bos, cfg.data.skip_identical, dict(cfg.data.columns or {})]
    # No need to tokenise rows a dry run never sees (and nothing cached from such cuts).
    limits = ({"train": DRY_RUN_BATCHES * train_step, "test": DRY_RUN_BATCHES * eval_step}
              if cfg.dry_run else {})
    splits = ("test",) if cfg.data.streaming else ("train", "test")
    for name in cfg.dataset_list:
        tokenized = {split: split_pairs(cfg, name, split, tokenizer, bundle, add_bos,
                                        settings if tokenizer_key and not limits else None,
                                        limits.get(split))
                     for split in splits}
        bundle.train += tokenized.get("train", [])
        bundle.eval += tokenized["test"]
        bundle.sources[name] = (len(tokenized.get("train", [])), len(tokenized["test"]))
    if cfg.data.streaming:
        bundle.stream = training_stream(cfg, tokenizer, bundle, add_bos)
    if cfg.dry_run:  # 10 global batches in all, not per dataset
        bundle.train = bundle.train[:DRY_RUN_BATCHES * train_step]
        bundle.eval = bundle.eval[:DRY_RUN_BATCHES * eval_step]
    bundle.unpaired = unpaired_rows(cfg, bundle)
    skipped = bundle.skipped
    why = (f"; skipped {skipped.total} rows: {dict(skipped.counts)}; first: "
           + "; ".join(skipped.examples) if skipped.total else "")
    if len(bundle.train) < train_step and bundle.stream is None:
        fix = ("fix the rows (`moedpo data inspect ...` shows them)" if skipped.total
               else "the train split is empty: give it pairs" if not bundle.train
               else "lower the batch size")
        raise DataError(f"datasets={cfg.datasets}: {len(bundle.train)} usable training pairs, "
                        f"fewer than one step needs ({train_step}){why}; {fix}")
    if not bundle.eval:
        raise DataError(f"datasets={cfg.datasets}: no usable evaluation pairs{why}")
    if cfg.data.weights is not None and bundle.stream is None:
        for (name, (n_train, _)), weight in zip(bundle.sources.items(), cfg.data.weights,
                                                strict=True):
            if n_train == 0 and weight > 0:
                raise DataError(f"data.weights: the source {name} has no usable training pairs "
                                f"but weight {weight}{why}; fix its rows, or drop it from "
                                "datasets and data.weights")
    return bundle
