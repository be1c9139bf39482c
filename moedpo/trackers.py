"""Experiment trackers (`loggers=[tensorboard,wandb,mlflow]`), fed the same metric names as
metrics.jsonl. TensorBoard is always available; wandb and MLflow are optional extras."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from .config import ConfigError


class TensorBoard:
    def __init__(self, run_dir: Path, purge_step: int, **_) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides events an interrupted run logged past its
        # checkpoint, so TensorBoard's step axis has each step once.
        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                purge_step=purge_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def expert_load(self, tag: str, step: int, counts: torch.Tensor) -> None:
        """One histogram per layer whose buckets are the experts: the full expert load."""
        edges = [e + 0.5 for e in range(counts.shape[-1])]
        for layer, row in enumerate(counts.tolist()):
            self.tb.add_histogram_raw(
                f"{tag}/layer{layer}", min=0, max=len(row) - 1, num=sum(row),
                sum=sum(e * c for e, c in enumerate(row)),
                sum_squares=sum(e * e * c for e, c in enumerate(row)),
                bucket_limits=edges, bucket_counts=row, global_step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        cols = [k for k in rows[0] if k != "step"]
        table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        for row in rows:
            table += "| " + " | ".join(str(row[c]).replace("\n", "\\n").replace("|", "/")
                                       for c in cols) + " |\n"
        self.tb.add_text("samples", table, step)

    def close(self) -> None:
        self.tb.close()


class Wandb:
    def __init__(self, run_dir: Path, config: dict, name: str, **_) -> None:
        import wandb

        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
        # Offline unless the user chose otherwise, as the seed recipe sets WANDB_MODE=offline.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "moedpo"), name=name,
                              id=run_id, resume="allow", dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def expert_load(self, tag: str, step: int, counts: torch.Tensor) -> None:
        pass  # the min/max load scalars are logged; wandb has no bucketed histogram of ours

    def samples(self, step: int, rows: list[dict]) -> None:
        import wandb

        cols = list(rows[0])
        self.run.log({"samples": wandb.Table(columns=cols, data=[[r[c] for c in cols]
                                                                  for r in rows])}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, config: dict, name: str, **_) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # A SQLite store in the run dir: MLflow 3 refuses its old `./mlruns` file store
            # (maintenance mode); `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`.
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        self.mlflow = mlflow
        mlflow.start_run(run_name=name)
        mlflow.log_params({k: str(v)[:250] for k, v in _flatten(config).items()})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def expert_load(self, tag: str, step: int, counts: torch.Tensor) -> None:
        pass

    def samples(self, step: int, rows: list[dict]) -> None:
        self.mlflow.log_dict({"samples": rows}, f"samples/step_{step:08d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


TRACKERS = {"tensorboard": (TensorBoard, "tensorboard"), "wandb": (Wandb, "wandb"),
            "mlflow": (MLflow, "mlflow")}


def make_trackers(names: list[str], run_dir: Path, purge_step: int = 0,
                  config: dict | None = None, name: str = "") -> list:
    trackers = []
    for logger in names:
        cls, package = TRACKERS[logger]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"loggers: '{logger}' needs its package: pip install {package}")
        trackers.append(cls(run_dir=run_dir, purge_step=purge_step, config=config or {},
                            name=name))
    return trackers
