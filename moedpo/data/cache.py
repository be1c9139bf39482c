"""The tokenisation cache: a split's tokenised pairs, kept on disk by what made them.

Reading and tokenising a large set takes minutes (100k conversational rows: ~2 min here,
most of it in the chat template), and a second run with the same data, tokenizer and
settings would redo the same work. Each split's result is stored under a key hashing the
source's content version (`readers.Split.digest`), the tokenizer (its full serialised
definition and chat template), and every setting that changes ids; a second run reads it
back in seconds. Written here rather than through `datasets.map`'s cache: its key is the
dataset's fingerprint, which rows read line by line here do not have, and ragged int32 ids
read back faster from one .npy than as Arrow rows. Files are .npy (read with
allow_pickle=False) and JSON, never pickles; an entry is written to a temporary folder and
renamed, so a killed run leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from .pairs import DataError, SkipLog
from .tokenize import TokenizedPair, TokenizeStats

log = logging.getLogger("moedpo")
CACHE_VERSION = 2  # 2: labels.npy (unpaired rows)
# The code that turns rows into ids is part of the key: an edited parser or tokeniser never
# reads ids its older self wrote.
CODE = ("formats.py", "pairs.py", "readers.py", "sources.py", "templates.py", "tokenize.py")


def _code_digest() -> str:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in CODE)).hexdigest()


def default_dir() -> Path:
    """$MOEDPO_CACHE/tokenized, else $XDG_CACHE_HOME (~/.cache)/moedpo/tokenized."""
    base = os.environ.get("MOEDPO_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moedpo"
    return Path(base).expanduser() / "tokenized"


def tokenizer_digest(tokenizer) -> str | None:
    """The tokenizer's full definition (vocabulary, merges, normalizer, pre- and
    post-processing, added tokens) and chat template; None for a slow (Python) tokenizer,
    whose definition is not one serialisable object: not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(backend.to_str().encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template,
                         tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, _code_digest(), *parts], sort_keys=True,
                                     default=str).encode()).hexdigest()[:32]


def save(folder: Path, key: str, pairs: list[TokenizedPair], skipped: SkipLog,
         stats: TokenizeStats, formats: Counter) -> None:
    """Best effort: a cache that cannot be written (full disk, read-only) costs only speed."""
    target, tmp = folder / key, None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{key}-"))
        lengths = np.array([[len(p.prompt), len(p.chosen), len(p.rejected)] for p in pairs],
                           dtype=np.int64).reshape(-1, 3)
        ids = np.concatenate([np.frombuffer(getattr(p, k), dtype=np.int32) for p in pairs
                              for k in ("prompt", "chosen", "rejected")]) if pairs \
            else np.zeros(0, dtype=np.int32)
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "lengths.npy", lengths)
        # Unpaired rows' labels: -1 for a pair, 0 / 1 for an undesirable / desirable row.
        np.save(tmp / "labels.npy", np.array([-1 if p.label is None else int(p.label)
                                              for p in pairs], dtype=np.int8))
        np.save(tmp / "raw_lengths.npy", np.array(list(stats.lengths.values()),
                                                  dtype=np.int64).reshape(3, -1))
        (tmp / "meta.json").write_text(json.dumps({
            "formats": dict(formats),
            "skipped": {"counts": dict(skipped.counts), "examples": skipped.examples},
            "stats": {"counts": dict(stats.counts), "boundary": stats.boundary,
                      "boundary_example": stats.boundary_example,
                      "identical": stats.identical}}))
        os.replace(tmp, target)
    except OSError as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if (target / "meta.json").exists():  # another process (rank) wrote it first
            return
        log.warning("tokenisation cache not written (%s: %s); the next run tokenises again",
                    type(err).__name__, err)


def load(folder: Path, key: str, skipped: SkipLog,
         stats: TokenizeStats) -> tuple[list[TokenizedPair], Counter] | None:
    """(the cached pairs, their row formats), their skips and statistics put in `skipped`
    and `stats` (fresh ones); None when there is no such entry or it cannot be read."""
    entry = folder / key
    try:
        meta = json.loads((entry / "meta.json").read_text())
        ids = np.load(entry / "ids.npy", allow_pickle=False)
        lengths = np.load(entry / "lengths.npy", allow_pickle=False)
        raw = np.load(entry / "raw_lengths.npy", allow_pickle=False)
        labels = np.load(entry / "labels.npy", allow_pickle=False).tolist()
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if skipped.strict and meta["skipped"]["counts"]:
        raise DataError(f"{meta['skipped']['examples'][0]} (data.strict=true; set it false to "
                        "skip such rows)")
    skipped.counts.update(meta["skipped"]["counts"])
    skipped.examples += meta["skipped"]["examples"]
    st = meta["stats"]
    stats.counts.update(st["counts"])
    stats.boundary, stats.boundary_example = st["boundary"], st["boundary_example"]
    stats.identical = st["identical"]
    stats.lengths = dict(zip(stats.lengths, raw.tolist(), strict=True))
    ends = np.cumsum(lengths.reshape(-1))
    starts = ends - lengths.reshape(-1)
    pieces = [_int32(ids[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    pairs = [TokenizedPair(*(pieces[i:i + 3]), label=None if label < 0 else bool(label))
             for i, label in zip(range(0, len(pieces), 3), labels, strict=True)]
    return pairs, Counter(meta["formats"])


def _int32(values: np.ndarray) -> array:
    out = array("i")
    out.frombytes(values.astype(np.int32, copy=False).tobytes())
    return out
