"""Metric accumulation and the run's outputs: metrics.jsonl, TensorBoard, a console line.

Every logged row carries `step` (the 0-based loop step), `examples` (pairs seen) and keys
prefixed `train/` or `eval/`; TensorBoard gets the same names on the step axis.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import torch

log = logging.getLogger("moedpo")


class MeanMetrics:
    """Running means over a window: per-pair values averaged over pairs, per-step values
    (grad norm, lr) over steps, router losses over tokens, MoE routing counts summed."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0
        self.scalars: dict[str, list[float]] = defaultdict(list)
        self.expert_counts: torch.Tensor | None = None  # [layers, experts]
        self.routing = defaultdict(float)
        # Training time and real tokens in the window: its throughput. Part of the state, so
        # a resumed window's examples/s divides its restored pairs by its restored seconds.
        self.seconds = 0.0
        self.tokens = 0
        # Per-pair means by group (eval per data source): group -> key -> sum; "num_examples"
        # is the group's count.
        self.groups: dict[str, dict[str, float]] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        n = next(iter(values.values())).numel()
        for key, value in values.items():
            self.sums[key] += float(value.detach().cpu().double().sum())
        self.count += n

    def add_grouped(self, values: dict[str, torch.Tensor], labels: list[str],
                    groups: list[str]) -> None:
        """Per-pair `values` summed by each pair's label as well. Every group gets every key
        (zero where a batch has none of it), so all ranks hold the same keys to reduce."""
        for group in groups:
            chosen = torch.tensor([label == group for label in labels])
            sums = self.groups.setdefault(group, defaultdict(float))
            sums["num_examples"] += float(chosen.sum())
            for key, value in values.items():
                sums[key] += float(value.detach().cpu().double()[chosen].sum())

    def add_scalars(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.scalars[key].append(value)

    def add_output(self, out) -> None:
        """A loss.DPOOutput: its per-pair metrics and, for MoE, its router statistics."""
        self.add(out.metrics)
        router = out.router
        if router is None:
            return
        counts = router.expert_counts.cpu().float()
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts
        tokens = float(router.real_tokens)
        # Router losses are means over a batch's tokens: weighted by them, the window's value
        # is the mean over all its tokens, whatever the batches' sizes.
        self.routing["aux_loss"] += float(router.aux_loss.detach()) * tokens
        self.routing["z_loss"] += float(router.z_loss.detach()) * tokens
        self.routing["slots"] += tokens * router.top_k
        self.routing["tokens"] += tokens
        self.routing["dropped"] += float(router.dropped_slots)
        self.routing["fully_dropped"] += float(router.fully_dropped_tokens)
        if router.drift is not None:  # sums over the same tokens as "tokens"
            for name, sums in (("agreement", router.drift.agreement),
                               ("router_kl", router.drift.kl)):
                for layer, value in enumerate(sums.tolist()):
                    self.routing[f"{name}/layer{layer}"] += value

    def state(self) -> dict:
        """JSON-able, for checkpoints: a resumed run continues the same report window."""
        return {"sums": dict(self.sums), "count": self.count, "scalars": dict(self.scalars),
                "routing": dict(self.routing), "seconds": self.seconds, "tokens": self.tokens,
                "expert_counts": None if self.expert_counts is None
                else self.expert_counts.tolist()}

    @classmethod
    def from_state(cls, state: dict) -> MeanMetrics:
        metrics = cls()
        metrics.sums.update(state["sums"])
        metrics.count = state["count"]
        metrics.scalars.update({k: list(v) for k, v in state["scalars"].items()})
        metrics.routing.update(state["routing"])
        metrics.seconds, metrics.tokens = state.get("seconds", 0.0), state.get("tokens", 0)
        if state["expert_counts"] is not None:
            metrics.expert_counts = torch.tensor(state["expert_counts"])
        return metrics

    def reduced(self, backend) -> MeanMetrics:
        """The same window summed over all ranks (itself in a single process): one flat
        all-reduce over the union of the ranks' keys, which differ where a rank saw no pair
        (an eval set smaller than a round of eval batches leaves the last ranks none)."""
        if not backend.distributed:
            return self
        names = [f"s\0{k}" for k in self.sums] + [f"c\0{k}" for k in self.scalars]
        names += [f"r\0{k}" for k in self.routing]
        names += [f"g\0{g}\0{k}" for g, sums in self.groups.items() for k in sums]
        if self.expert_counts is not None:
            names.append("e\0" + ",".join(map(str, self.expert_counts.shape)))
        names = backend.union(names)
        flat = [float(self.count)]
        for name in names:
            kind, _, key = name.partition("\0")
            if kind == "s":
                flat.append(self.sums.get(key, 0.0))
            elif kind == "c":  # per-step values: mean over the ranks that have them
                values = self.scalars.get(key)
                flat += [sum(values) / len(values), 1.0] if values else [0.0, 0.0]
            elif kind == "r":
                flat.append(self.routing.get(key, 0.0))
            elif kind == "g":
                group, _, key = key.partition("\0")
                flat.append(self.groups.get(group, {}).get(key, 0.0))
        shape = [tuple(int(n) for n in name[2:].split(",")) for name in names
                 if name.startswith("e\0")]
        if shape:
            counts = (torch.zeros(shape[0]) if self.expert_counts is None
                      else self.expert_counts)
            flat += counts.reshape(-1).tolist()
        total = backend.all_reduce_sum(torch.tensor(flat, dtype=torch.float64)).tolist()
        out = MeanMetrics()
        out.count, i = int(total[0]), 1
        for name in names:
            kind, _, key = name.partition("\0")
            if kind == "s":
                out.sums[key], i = total[i], i + 1
            elif kind == "c":
                out.scalars[key], i = [total[i] / max(total[i + 1], 1.0)], i + 2
            elif kind == "r":
                out.routing[key], i = total[i], i + 1
            elif kind == "g":
                group, _, key = key.partition("\0")
                out.groups.setdefault(group, defaultdict(float))[key], i = total[i], i + 1
        if shape:
            out.expert_counts = torch.tensor(total[i:]).float().reshape(shape[0])
        return out

    def means(self) -> dict[str, float]:
        out = {key: total / max(self.count, 1) for key, total in self.sums.items()}
        out.update({key: sum(v) / len(v) for key, v in self.scalars.items()})
        out["num_examples"] = self.count
        for group, sums in self.groups.items():
            count = max(sums["num_examples"], 1)
            out.update({f"{group}/{key}": value if key == "num_examples" else value / count
                        for key, value in sums.items()})
        if self.expert_counts is not None:
            for key in ("aux_loss", "z_loss"):
                out[f"router/{key}"] = self.routing[key] / max(self.routing["tokens"], 1)
            out["moe/dropped_fraction"] = self.routing["dropped"] / max(self.routing["slots"], 1)
            out["moe/fully_dropped_fraction"] = (self.routing["fully_dropped"]
                                                 / max(self.routing["tokens"], 1))
            # The denominator of the routing shares: one token's choice moves a load by
            # about num_experts / routed_tokens.
            out["moe/routed_tokens"] = self.routing["tokens"]
            # Load of each expert relative to a perfect balance (1.0 = its fair share).
            load = self.expert_counts / self.expert_counts.sum(-1, keepdim=True).clamp(min=1)
            load = load * load.shape[-1]
            for layer, row in enumerate(load):
                out[f"moe/load_min/layer{layer}"] = float(row.min())
                out[f"moe/load_max/layer{layer}"] = float(row.max())
            out["moe/expert_load"] = [[round(v, 4) for v in row] for row in load.tolist()]
            out.update(drift_means(self.routing, self.expert_counts))
        return out


def drift_means(routing: dict[str, float], expert_counts: torch.Tensor) -> dict[str, float]:
    """Per layer and averaged over layers: the expert loads' coefficient of variation (std /
    mean of the counts: 0 = perfect balance) and, where the reference's routers ran, the
    routing agreement with them and the router KL (models/drift.py)."""
    counts = expert_counts.double()
    cv = counts.std(-1, unbiased=False) / counts.mean(-1).clamp(min=1e-12)
    out = {f"moe/load_cv/layer{layer}": float(v) for layer, v in enumerate(cv)}
    out["moe/load_cv"] = float(cv.mean())
    tokens = max(routing["tokens"], 1)
    for name, key in (("agreement", "moe/routing_agreement"), ("router_kl", "moe/router_kl")):
        layers = sorted((k for k in routing if k.startswith(f"{name}/layer")),
                        key=lambda k: int(k.rsplit("layer", 1)[1]))
        if layers:
            values = [routing[k] / tokens for k in layers]
            out.update({f"{key}/layer{i}": v for i, v in enumerate(values)})
            out[key] = sum(values) / len(values)
    return out


class MetricsError(ValueError):
    """A metrics.jsonl that cannot be read; the message names the file and line."""


def strict(value):
    """NaN and infinities as null: metrics.jsonl is strict JSON, readable by any parser."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [strict(v) for v in value]
    return value


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows. A torn last line (a crash or a full disk mid-write) is dropped
    with a warning; a bad line elsewhere is an error naming it."""
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise MetricsError(f"{path}:{number}: not a JSON row; fix or delete the "
                                   "line") from None
            log.warning("%s:%d: dropping a torn last line (an interrupted write)", path, number)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise MetricsError(f"{path}:{number}: a row without its integer \"step\" (every "
                               "moedpo row has one); fix or delete the line")
        rows.append(row)
    return rows


class MetricWriter:
    """metrics.jsonl (always) and the configured trackers; only rank 0 writes."""

    def __init__(self, run_dir: Path, loggers: list[str] | tuple[str, ...] = ("tensorboard",),
                 purge_step: int = 0, enabled: bool = True, config: dict | None = None,
                 name: str = "") -> None:
        from .trackers import make_trackers

        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = make_trackers(list(loggers), run_dir, purge_step, config,
                                      name) if enabled else []

    def write(self, step: int, examples: int, split: str, metrics: MeanMetrics,
              extra: dict[str, float] | None = None) -> dict:
        values = {**metrics.means(), **(extra or {})}
        row = {"step": step, "examples": examples}
        row.update({f"{split}/{key}": value for key, value in values.items()})
        if not self.enabled:
            return row
        with self.path.open("a") as f:
            f.write(json.dumps({k: strict(v) for k, v in row.items()}, allow_nan=False) + "\n")
        scalars = {k: v for k, v in row.items()
                   if k not in ("step", "examples") and isinstance(v, int | float)}
        for tracker in self.trackers:
            tracker.scalars(step, scalars)
            if metrics.expert_counts is not None:
                tracker.expert_load(f"{split}/moe/expert_load", step, metrics.expert_counts)
        return row

    def write_samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        with (self.path.parent / "samples.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.samples(step, rows)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def console_line(step: int, max_steps: int, split: str, values: dict[str, float]) -> str:
    parts = [f"{split} step {step}/{max_steps}"]
    if "loss" not in values:
        return parts[0] + " | no finite step since the last report"
    parts += [f"loss {values['loss']:.4f}", f"acc {values['rewards/accuracies']:.3f}",
              f"margin {values['rewards/margins']:.3f}"]
    if "grad_norm" in values:
        parts += [f"grad_norm {values['grad_norm']:.3f}", f"lr {values['lr']:.2e}",
                  f"{values['examples_per_second']:.1f} pairs/s",
                  f"{values['tokens_per_second']:.0f} tok/s"]
    if values.get("moe/dropped_fraction"):
        parts.append(f"dropped {values['moe/dropped_fraction']:.3f}")
    return " | ".join(parts)
