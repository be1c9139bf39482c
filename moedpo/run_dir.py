"""The run directory: what a new run keeps aside, where a resumed run picks up, and the
resolved config it records. Nothing a user wrote or trained is deleted without overwrite=true.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from .checkpoint import Checkpointer, CheckpointError
from .config import DPOConfig
from .metrics import read_rows
from .parallel.backend import Backend

log = logging.getLogger("moedpo")
OUTPUTS = ("metrics.jsonl", "tensorboard")


def find_resume(cfg: DPOConfig, checkpointer: Checkpointer) -> str | None:
    """The checkpoint this run continues from, or None to start fresh."""
    mode = cfg.resume_mode
    if mode is None:
        if checkpointer.complete_steps() and not cfg.overwrite:
            raise CheckpointError(
                f"resume=false but {checkpointer.root} holds checkpoints (newest "
                f"{checkpointer.latest()}); resume=auto continues it, overwrite=true starts "
                "over and deletes them, or choose another exp_name/checkpoint.dir")
        return None
    if mode == "auto":
        return checkpointer.latest()
    return mode


def set_aside(run_dir: Path) -> None:
    """A fresh run keeps an earlier run's metrics and TensorBoard logs as *.prevN."""
    for name in OUTPUTS:
        old = run_dir / name
        if old.exists():
            n = 1
            while (run_dir / f"{name}.prev{n}").exists():
                n += 1
            old.rename(run_dir / f"{name}.prev{n}")
            log.info("kept the earlier run's %s as %s.prev%d", name, name, n)


def trim_metrics(run_dir: Path, start_step: int) -> None:
    """A resumed run drops the rows an interrupted run logged at or after `start_step`, so
    that no step appears twice."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = read_rows(path)  # a torn last line is dropped
    kept = [row for row in rows if row["step"] < start_step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(path)


def prepare(cfg: DPOConfig, checkpointer: Checkpointer,
            backend: Backend) -> tuple[Path, str | None]:
    """Create run_dir, decide fresh or resumed (the same on every rank), record the config.
    Returns (run_dir, checkpoint to resume from or None). Only rank 0 touches files."""
    run_dir = cfg.run_dir
    if backend.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointer.clean_partial()
    backend.barrier()
    resume = find_resume(cfg, checkpointer)
    backend.barrier()
    if backend.is_main:
        if resume is None:
            if cfg.overwrite:
                checkpointer.remove_all()
            set_aside(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    backend.barrier()
    return run_dir, resume
