"""Training pairs read as the loop goes (`data.streaming=true`): for sets too large to hold
or to tokenise before the first step, and Hub sets read without downloading them first.

Raw rows of the training splits (the sources chained in order) pass through a seeded shuffle
buffer of `data.shuffle_buffer` rows, then are parsed and tokenised in small batches as
steps need pairs. An epoch ends when the sources run out; the next one reads them again
with another buffer seed. The state is (epoch, rows handed out): a resumed run reads the
epoch's rows again through the same buffer and skips that many without tokenising them, so
it continues with exactly the pairs an unbroken run would have seen. Every rank reads the
whole stream and takes its share of each step, as with held data.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .pairs import DataError, Pair, RowError, SkipLog
from .tokenize import TokenizedPair

# (row, origin, its source's parser)
Rows = Iterator[tuple[dict, str, Callable[[dict, str], Pair]]]
CHUNK = 256  # rows tokenised at once: the fast tokenizer's batch


def shuffled(rows: Rows, buffer: int, seed: int) -> Rows:
    """A seeded shuffle buffer: each row comes out after up to `buffer` later ones came in
    (the usual streaming shuffle; `buffer` <= 1 keeps the order)."""
    if buffer <= 1:
        yield from rows
        return
    rng, held = random.Random(seed), []
    for row in rows:
        if len(held) < buffer:
            held.append(row)
            continue
        i = rng.randrange(buffer)
        yield held[i]
        held[i] = row
    rng.shuffle(held)
    yield from held


@dataclass
class PairStream:
    """Endless training pairs from `open_rows()` (the chained training splits, reopened each
    epoch, each row with its source's parser), tokenised by `tokenize(pairs, log)`."""

    open_rows: Callable[[], Rows]
    tokenize: Callable[[list[Pair], SkipLog], list[TokenizedPair]]
    seed: int
    buffer: int
    skipped: SkipLog = field(default_factory=SkipLog)
    # Where the pairs handed out so far end: (epoch, raw rows of that epoch behind them).
    epoch: int = 0
    handed: int = 0
    _rows: Iterator | None = None
    _reading: int = 0  # the epoch being read (ahead of `epoch` at an epoch's end)
    _read: int = 0  # raw rows of it read so far
    _ready: deque = field(default_factory=deque)  # (pair, epoch, raw index) tokenised ahead

    def state(self) -> dict:
        return {"epoch": self.epoch, "rows": self.handed}

    def restore(self, state: dict) -> None:
        """Continue at `state`: the epoch's rows read again, the handed-out ones skipped
        (read, not tokenised)."""
        self._open(state["epoch"])
        for _ in range(state["rows"]):
            if next(self._rows, None) is None:
                raise DataError(f"data.streaming: the checkpoint was {state['rows']} rows into "
                                f"epoch {state['epoch']}, but the training data now has fewer; "
                                "resume with the data it was trained on")
        self.epoch, self.handed, self._read = state["epoch"], state["rows"], state["rows"]

    def _open(self, epoch: int) -> None:
        self._rows = shuffled(self.open_rows(), self.buffer, self.seed + 7919 * epoch)
        self._reading, self._read, self._ready = epoch, 0, deque()

    def take(self, n: int) -> list[TokenizedPair]:
        out = []
        while len(out) < n:
            if not self._ready:
                self._fill()
                continue
            pair, self.epoch, index = self._ready.popleft()
            self.handed = index + 1
            out.append(pair)
        return out

    def _fill(self) -> None:
        """Tokenise the next CHUNK usable rows; at the end of the sources, open the next
        epoch (its pairs queue behind the last ones of this one)."""
        if self._rows is None:
            self._open(0)
        batch, indices, ended = [], [], True
        for row, origin, parse in self._rows:
            index, self._read = self._read, self._read + 1
            try:
                batch.append(parse(row, origin))
                indices.append(index)
            except RowError as err:  # ShapeError included: in a stream, any row may be odd
                self.skipped.skip(origin, str(err))
            if len(batch) == CHUNK:
                ended = False
                break
        recorder = _Recorder(self.skipped)
        pairs = self.tokenize(batch, recorder)
        kept = [i for p, i in zip(batch, indices, strict=True) if p.origin not in recorder.dropped]
        self._ready.extend((p, self._reading, i) for p, i in zip(pairs, kept, strict=True))
        if ended:
            if self._read == 0 or (self._reading > self.epoch + 1):
                raise DataError("data.streaming: the training sources hold no usable pair "
                                f"(skipped: {dict(self.skipped.counts)})")
            ready = self._ready
            self._open(self._reading + 1)
            self._ready = ready


class _Recorder(SkipLog):
    """Passes skips on to `inner` and remembers which rows (origins) it skipped."""

    def __init__(self, inner: SkipLog) -> None:
        super().__init__(strict=inner.strict)
        self.inner, self.dropped = inner, set()

    def skip(self, origin: str, reason: str) -> None:
        self.dropped.add(origin)
        self.inner.skip(origin, reason)
