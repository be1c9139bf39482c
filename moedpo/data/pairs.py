"""What every data module shares: a preference pair, the log of skipped rows, the errors."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# A chat: [{"role": "user", "content": "..."}, ...], as datasets and chat templates hold it.
Messages = list[dict[str, Any]]


class DataError(ValueError):
    """A user-facing data problem; the message names the file (or dataset) and line."""


class RowError(ValueError):
    """A row that cannot become a preference pair; the message is the reason."""


@dataclass(frozen=True)
class Pair:
    """One preference pair before tokenisation. Standard pairs hold text; conversational ones
    hold message lists that the chat template renders (`template_kwargs`: the row's `tools`
    and `chat_template_kwargs`)."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    origin: str  # "file:line" or "hub_id[split] row N", for error messages
    format: str = "standard"  # formats.FORMATS key
    template_kwargs: dict[str, Any] | None = None
    # Unpaired rows (KTO): the completion is `chosen` (and, until data/unpaired.py gives it
    # another row's completion for the KL estimate, `rejected`); True = desirable.
    label: bool | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class SkipLog:
    """Counts of skipped rows by reason, with the first few locations for the report."""

    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def skip(self, origin: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{origin}: {reason} (data.strict=true; set it false to skip "
                            "such rows)")
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{origin}: {reason}")

    def merge(self, other: SkipLog) -> None:
        self.counts.update(other.counts)
        self.examples += other.examples[:max(self.max_examples - len(self.examples), 0)]

    @property
    def total(self) -> int:
        return sum(self.counts.values())
