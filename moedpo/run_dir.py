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
from .config import ConfigError, DPOConfig
from .metrics import read_rows
from .parallel.backend import Backend

log = logging.getLogger("moedpo")
OUTPUTS = ("metrics.jsonl", "tensorboard")
LOCK = ".moedpo.lock"
HOLDER = LOCK + ".holder"


class RunLocked(CheckpointError):
    """Another live run holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory for the whole run: an OS file lock (filelock:
    flock on POSIX) on run_dir/.moedpo.lock, held by the main process. The kernel drops it
    when the process ends, however it ends (SIGKILL, a crash, a full disk), so no lock is
    ever stale and none has to be taken over; who holds it (host, pid, start time) is written
    beside it (.moedpo.lock.holder) for the refusal message only. A second run of the same
    directory is refused at once (it would resume from the first one's checkpoints while
    they are being written, and both would append to metrics.jsonl). Every rank learns the
    outcome, so none waits on a refused run."""

    def __init__(self, run_dir: Path, backend: Backend) -> None:
        self.path, self.backend, self.lock = run_dir / LOCK, backend, None
        self.holder = run_dir / HOLDER

    def _take(self) -> str | None:
        """None when taken, else who holds it."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=0)
        except Timeout:
            try:
                holder = json.loads(self.holder.read_text())
            except (OSError, ValueError):
                holder = {}
            holder = holder if isinstance(holder, dict) else {}
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {since}"
        except OSError as err:
            raise CheckpointError(f"cannot create the run lock {self.path}: "
                                  f"{err.strerror or err}") from None
        self.lock = lock
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        try:  # only for the message a refused run prints: the lock holds without it
            tmp = self.holder.with_suffix(".tmp")
            tmp.write_text(json.dumps(me))
            tmp.replace(self.holder)
        except OSError as err:
            log.warning("could not record the holder of %s (%s); the run holds it all the "
                        "same", self.path, err.strerror or err)
        return None

    def __enter__(self) -> RunLock:
        import torch

        holder = self._take() if self.backend.is_main else None
        refused = float(self.backend.all_reduce_sum(torch.tensor([float(holder is not None)]))[0])
        if refused:
            self.__exit__()
            raise RunLocked(f"{self.path.parent} is in use by another run "
                            f"({holder or 'see rank 0'}); wait for it, or choose another "
                            "exp_name")
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.holder.unlink(missing_ok=True)
            self.lock.release()
            self.lock = None


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


# Settings a resumed run may change: when and what it reports and saves, how far it goes,
# and how it computes the same values (memory and speed). Any other change (model, optimizer
# and schedule, batch geometry, data, loss) makes another run than the checkpoint's.
SAFE_ON_RESUME = (
    "exp_name", "max_steps", "n_epochs", "eval_frequency", "do_first_eval", "report_metrics_freq",
    "sample_during_eval", "n_eval_model_samples", "sample_max_new_tokens", "sample_reference",
    "loggers", "resume", "overwrite", "output_dir", "max_consecutive_nonfinite", "checkpoint.",
    "num_proc", "local_compile_cache_dir", "per_device_eval_batch_size", "parallel.",
    "tensor_parallelism", "model.compile", "model.activation_checkpointing",
    "model.meta_init", "model.logps_chunk_size", "model.flash_attention",
    "model.attn_implementation",
    "model.fsdp_config.", "reference.cpu_offload", "reference.cache_dir",
    "reference.precompute", "data.share_prompt", "data.packing", "data.max_tokens_per_row",
    "data.static_shapes", "data.length_buckets", "data.strict",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "dataset_dir":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_config(saved: dict, now: dict) -> list[str]:
    """The safe changes of a resumed run against the settings its checkpoint was written
    with; a change that would make it another run is a ConfigError with the diff and the
    way out."""
    before, after = _flat(saved), _flat(now)
    changes = [(k, before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys())
               if before.get(k) != after.get(k)]
    breaking = [c for c in changes if not c[0].startswith(SAFE_ON_RESUME)]
    if breaking:
        diff = ", ".join(f"{k}: {a} -> {b}" for k, a, b in breaking)
        raise ConfigError(f"resume: the checkpoint was trained with other settings ({diff}); "
                          "resuming would make another run. Set them back, or start over "
                          "(resume=false overwrite=true, or another exp_name)")
    return [f"{k}: {a} -> {b}" for k, a, b in changes]


def resume_settings(checkpointer: Checkpointer, resume: str, auto: bool) -> dict | None:
    """The settings of the checkpoint a resume starts from, to check the run's against. With
    resume=auto a newest checkpoint whose trainer_state.json is torn is passed over for the
    one before it, as loading will pass it over (checkpoint.load_newest): a damaged file never
    switches the check off. A named checkpoint with no readable state is an error. None: a
    checkpoint written before moedpo recorded its settings."""
    import fsspec

    paths = ([checkpointer.step_path(s) for s in reversed(checkpointer.complete_steps())]
             if auto else [resume])
    for path in paths:
        try:
            with fsspec.open(f"{path.rstrip('/')}/trainer_state.json") as f:
                state = json.load(f)
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            if not auto:
                raise CheckpointError(f"resume={path}: its trainer_state.json is unreadable "
                                      f"({err}); resume from another checkpoint") from None
            log.warning("%s: trainer_state.json is unreadable (%s); the settings are checked "
                        "against the checkpoint before it", path, err)
            continue
        return state.get("config")
    return None


def fetch(cfg: DPOConfig) -> None:
    """For a URL output_dir: bring the run's files that are already there (metrics,
    config, TensorBoard, samples of an earlier or interrupted run) into the local mirror,
    so a resumed run continues them and a fresh one keeps them aside, on any machine."""
    url = cfg.run_url
    if url is None:
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        return
    for remote in fs.find(root):
        relative = remote[len(root.rstrip("/")) + 1:]
        if relative.startswith("checkpoints/") or relative in (LOCK, HOLDER):
            continue  # checkpoints are read where they are
        local = cfg.run_dir / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(local))


# What each run's local mirror has uploaded: file -> (size, mtime_ns) when it was sent, so a
# publish sends only what changed since (a long run re-sent every file at every eval).
_SENT: dict[str, dict[str, tuple[int, int]]] = {}


def _upload_file(fs, local: str, target: str) -> None:
    """One file to the bucket, retried with exponential backoff (0.5, 1, 2, 4 s): a bucket's
    transient errors (a 503, a reset connection) must not end a long run."""
    from tenacity import Retrying, stop_after_attempt, wait_exponential

    for attempt in Retrying(stop=stop_after_attempt(5), reraise=True,
                            wait=wait_exponential(multiplier=0.5, max=8)):
        with attempt:
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(local, target)


def publish(cfg: DPOConfig) -> bool:
    """For a URL output_dir: upload the local mirror's files (metrics, config, TensorBoard,
    samples, Hydra's record) that changed since the last publish to output_dir/exp_name.
    Called after every eval, checkpoint and at the end; checkpoints themselves are written to
    the URL directly (a checkpoint that cannot be written stops the run, checkpoint.py). A
    file whose upload still fails after its retries is a warning and is sent again at the
    next publish: nothing is lost, the local mirror holds it. Returns whether all went up."""
    url = cfg.run_url
    if url is None:
        return True
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    sent = _SENT.setdefault(f"{cfg.run_dir}\0{url}", {})
    ok = True
    for path in sorted(cfg.run_dir.rglob("*")):
        if not path.is_file() or path.name in (LOCK, HOLDER) or path.name.endswith(".tmp"):
            continue
        relative = path.relative_to(cfg.run_dir).as_posix()
        stat = path.stat()
        if sent.get(relative) == (stat.st_size, stat.st_mtime_ns):
            continue
        try:
            _upload_file(fs, str(path), f"{root.rstrip('/')}/{relative}")
        except Exception as err:  # noqa: BLE001  (storage clients raise many types)
            ok = False
            log.warning("could not upload %s to %s (%s: %s); it stays in %s and is sent again "
                        "at the next publish", relative, url, type(err).__name__, err,
                        cfg.run_dir)
            continue
        sent[relative] = (stat.st_size, stat.st_mtime_ns)
    return ok


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
        fetch(cfg)
        checkpointer.clean_partial()
    backend.barrier()
    resume = find_resume(cfg, checkpointer)
    saved = resume_settings(checkpointer, resume, cfg.resume_mode == "auto") if resume else None
    if saved is not None:  # every rank raises alike: the same files, the same settings
        for change in check_resume_config(saved, OmegaConf.to_container(
                OmegaConf.structured(cfg))):
            log.info("resumed with a changed setting: %s", change)
    backend.barrier()
    if backend.is_main:
        if resume is None:
            if cfg.overwrite:
                checkpointer.remove_all()
            set_aside(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        publish(cfg)
    backend.barrier()
    return run_dir, resume
