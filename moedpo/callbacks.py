"""Hooks into a run, as TRL users know them: subclass `Callback`, override what you need, and
pass instances to `moedpo.train(..., callbacks=[...])`.

Every rank calls them with the same values (metrics are reduced over ranks first), so a
callback that writes somewhere checks `os.environ.get("RANK", "0") == "0"` itself
(`moedpo.train` under torchrun runs on every rank). They run between steps, never inside a
forward: a slow callback slows the run, nothing more.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Override any of these; each default does nothing."""

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """After each optimizer step: `loss` (the step's mean loss over all ranks'
        pairs), `grad_norm` and `lr` (the rate this step applied). `step` counts from 0."""

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """After each eval: the eval row as metrics.jsonl has it, without the `eval/`
        prefix (`loss`, `rewards/accuracies`, ...)."""

    def on_save(self, step: int, path: str) -> None:
        """After a checkpoint of `step` steps is complete at `path`."""

    def on_train_end(self, result: Any) -> None:
        """Once, when the run ends (finished or stopped by a signal): the RunResult."""


def fire(callbacks: list[Callback], event: str, *args: Any) -> None:
    for callback in callbacks:
        getattr(callback, event)(*args)

