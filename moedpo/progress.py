"""Progress on a terminal: a bar over steps with ETA and the latest metrics, and one per
eval pass. Off when stderr is not a terminal (CI, log files, schedulers), where the plain
report lines every `report_metrics_freq` steps are the progress."""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterable, Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def width() -> int:
    # shutil falls back to 80 columns where the terminal reports none (tqdm would draw nothing)
    return shutil.get_terminal_size().columns


class Progress(contextlib.AbstractContextManager):
    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self._redirect = contextlib.nullcontext()
        if enabled:
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                            ncols=width())
            # Log lines go above the bar instead of breaking it.
            self._redirect = logging_redirect_tqdm()

    def __enter__(self) -> Progress:
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._redirect.__exit__(*exc)
        if self.bar is not None:
            self.bar.close()

    def step(self, values: dict[str, float]) -> None:
        if self.bar is None:
            return
        shown = {"loss": "loss", "acc": "rewards/accuracies", "margin": "rewards/margins",
                 "pairs/s": "examples_per_second", "tok/s": "tokens_per_second",
                 "dropped": "moe/dropped_fraction"}
        self.bar.set_postfix({name: f"{values[key]:.3g}" for name, key in shown.items()
                              if key in values}, refresh=False)
        self.bar.update(1)

    def eval(self, batches: Iterable, total: int) -> Iterator:
        return batch_bar(batches, total, "eval", self.enabled)


def batch_bar(batches: Iterable, total: int, desc: str, enabled: bool = True) -> Iterator:
    """A transient bar over one pass of batches (eval, reference precompute)."""
    if not enabled:
        return iter(batches)
    return iter(tqdm(batches, total=total, desc=desc, unit="batch", leave=False, ncols=width()))
