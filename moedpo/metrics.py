"""Metric accumulation and the run's outputs: metrics.jsonl, TensorBoard, a console line.

Every logged row carries `step` (the 0-based loop step), `examples` (pairs seen) and keys
prefixed `train/` or `eval/`; TensorBoard gets the same names on the step axis.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch

log = logging.getLogger("moedpo")


class MeanMetrics:
    """Running per-pair means: add batches of per-pair values, read the averages."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.scalars: dict[str, list[float]] = defaultdict(list)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        n = next(iter(values.values())).numel()
        for key, value in values.items():
            self.sums[key] += float(value.float().sum())
        self.count += n

    def add_scalars(self, values: dict[str, float]) -> None:
        """Per-step values (grad norm, lr): averaged over steps, not pairs."""
        for key, value in values.items():
            self.scalars[key].append(value)

    def means(self) -> dict[str, float]:
        out = {key: total / max(self.count, 1) for key, total in self.sums.items()}
        out.update({key: sum(v) / len(v) for key, v in self.scalars.items()})
        out["num_examples"] = self.count
        return out


class MetricWriter:
    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, step: int, examples: int, split: str, values: dict[str, float]) -> dict:
        row = {"step": step, "examples": examples}
        row.update({f"{split}/{key}": value for key, value in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "examples"):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()
        return row

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def console_line(step: int, max_steps: int, split: str, values: dict[str, float]) -> str:
    parts = [f"{split} step {step}/{max_steps}",
             f"loss {values['loss']:.4f}",
             f"acc {values['rewards/accuracies']:.3f}",
             f"margin {values['rewards/margins']:.3f}"]
    if "grad_norm" in values:
        parts += [f"grad_norm {values['grad_norm']:.3f}", f"lr {values['lr']:.2e}",
                  f"{values['examples_per_second']:.1f} pairs/s",
                  f"{values['tokens_per_second']:.0f} tok/s"]
    return " | ".join(parts)
