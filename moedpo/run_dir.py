"""The run directory: what a new run keeps aside, where a resumed run picks up, and the
resolved config it records. Nothing a user wrote or trained is deleted without overwrite=true.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from omegaconf import OmegaConf

from .checkpoint import Checkpointer, CheckpointError
from .config import DPOConfig
from .metrics import read_rows
from .parallel.backend import Backend

log = logging.getLogger("moedpo")
OUTPUTS = ("metrics.jsonl", "tensorboard")
LOCK = ".moedpo.lock"


class RunLocked(CheckpointError):
    """Another live run holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory for the whole run: a lock file naming the holder
    (host, pid, start time), created atomically by the main process. A second run of the
    same directory is refused at once (it would resume from the first one's checkpoints
    while they are being written, and both would append to metrics.jsonl). A lock whose
    process is gone (same host, pid not running: a SIGKILL, a crash) is stale and taken
    over with a warning. Every rank learns the outcome, so none waits on a refused run."""

    def __init__(self, run_dir: Path, backend: Backend) -> None:
        self.path, self.backend, self.held = run_dir / LOCK, backend, False

    def _take(self) -> str | None:
        """None when taken, else who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                same_host = holder.get("host") == me["host"]
                if same_host and isinstance(holder.get("pid"), int) and not _alive(
                        holder["pid"]):
                    log.warning("taking over the stale lock %s of process %d, which is gone",
                                self.path, holder["pid"])
                    self.path.unlink(missing_ok=True)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S",
                                      time.localtime(holder.get("since", 0)))
                return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {since}"
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return None
        return "a process that keeps taking it"

    def __enter__(self) -> RunLock:
        import torch

        holder = self._take() if self.backend.is_main else None
        refused = float(self.backend.all_reduce_sum(torch.tensor([float(holder is not None)]))[0])
        self.held = self.backend.is_main and holder is None
        if refused:
            raise RunLocked(
                f"{self.path.parent} is in use by another run ({holder or 'see rank 0'}); wait "
                f"for it, or choose another exp_name. If no such run exists, delete {self.path}")
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


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
