"""Checkpoints: torch.distributed.checkpoint (DCP) folders, written atomically.

Two uses share one format, `{"model": <state dict>, ...}` in a DCP folder:

- Training checkpoints in `checkpoint.dir` (`step_00000120/`): policy weights and optimizer
  state through DCP (sharded: one process, FSDP2 and SPMD alike), plus `trainer_state.json`
  (step, examples seen, schedule) and one `rankN.json` per rank (its RNG states and metric
  window). No
  pickles of ours: everything that is not a tensor is JSON. A checkpoint is written under
  `.tmp-step_...`, gets a `COMPLETE` marker last and is then renamed into place, so a crash
  mid-save leaves the previous checkpoint the newest usable one.
- `checkpoint_manager_path` (the original's key): weights restored into policy and reference
  before training, from a DCP folder or a folder of numbered step folders (the newest).

Paths may be local or any fsspec URL (gs:// with gcsfs).
"""

from __future__ import annotations

import base64
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from . import trust
from .private_api import fsspec_storage

log = logging.getLogger("moedpo")
# DCP's own failure (a full disk, a torn file) is a BaseException, not an Exception: every
# clause that turns a storage failure into a user-facing error names it too.
STORAGE_ERRORS = (OSError, RuntimeError, ValueError, CheckpointException)
COMPLETE = "COMPLETE"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    pass


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _reader(path: str) -> dcp.StorageReader:
    if _is_url(path):
        return fsspec_storage(path, write=False)
    return dcp.FileSystemReader(path.removeprefix("file://"))


def _writer(path: str) -> dcp.StorageWriter:
    if _is_url(path):
        return fsspec_storage(path, write=True)
    return dcp.FileSystemWriter(path.removeprefix("file://"))


def _no_planner() -> None:
    """DCP's default planner; a strategy whose tensors need their own (SPMD) gives one."""
    return None


def _first_line(err: BaseException) -> str:
    """The first line of what went wrong; for DCP's CheckpointException, which names only
    the failing ranks, the first rank's own error ("No space left on device")."""
    failures = getattr(err, "failures", None) if isinstance(err, CheckpointException) else None
    if failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return _first_line(inner)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- checkpoint_manager_path


def latest_checkpoint(path: str) -> str:
    """`path` itself if it is a DCP checkpoint, else its highest-numbered step folder
    (`<step>/` as the original's checkpoint manager writes, or moedpo's `step_<step>/`)."""
    fs, root = _fs(path)
    if fs.exists(f"{root}/.metadata"):
        return path
    if not fs.isdir(root):
        raise CheckpointError(f"checkpoint_manager_path={path}: no such folder")
    steps = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        number = name.removeprefix(STEP_PREFIX)
        if number.isdigit() and fs.exists(f"{root}/{name}/.metadata"):
            steps.append((int(number), name))
    if not steps:
        raise CheckpointError(f"checkpoint_manager_path={path}: holds no DCP checkpoint "
                              "(a .metadata file, or numbered step folders with one)")
    return f"{path.rstrip('/')}/{max(steps)[1]}"


def restore_weights(path: str, models: list[torch.nn.Module],
                    load_planner: Callable[[], Any] = _no_planner,
                    trusted: list[str] | None = None, trainable_only: bool = False,
                    key_of: Callable[[str], str | None] | None = None) -> str:
    """Load the newest checkpoint under `path` into every model (each keeps its dtype and
    sharding; a sharded model reads only its own shards, through the strategy's
    `load_planner`). With `trusted` (training), the
    checkpoint must be signed by this key or lie under one of those paths (moedpo.trust).
    `trainable_only`: the checkpoint holds only the parameters that train (LoRA's).
    `key_of`: the checkpoint's key of each of the model's keys, None for those it does not
    hold (a LoRA policy reads its base from a full model's checkpoint); several of the
    model's keys may read one."""
    checkpoint = latest_checkpoint(path)
    if trusted is not None:
        trust.check(checkpoint, trusted, "checkpoint_manager_path")
    for model in models:
        own = model.state_dict()
        if trainable_only:
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            own = {k: v for k, v in own.items() if k in names}
        source = {k: (key_of(k) if key_of else k) for k in own}
        state = {"model": {}}
        for k, key in source.items():
            if key is not None:
                state["model"].setdefault(key, own[k])
        try:
            dcp.load(state, storage_reader=_reader(checkpoint), planner=load_planner())
        except (Exception, CheckpointException) as err:  # DCP wraps errors in several types
            raise CheckpointError(f"checkpoint_manager_path={path}: cannot restore "
                                  f"{checkpoint} into the model: {_first_line(err)}") from None
        loaded = {k: state["model"][key] for k, key in source.items() if key is not None}
        model.load_state_dict(loaded, strict=not trainable_only and key_of is None)
    return checkpoint


def save_weights(model: torch.nn.Module, path: str) -> None:
    """Write `{"model": state_dict}` as a DCP checkpoint (the restore format above)."""
    dcp.save({"model": model.state_dict()}, storage_writer=_writer(path))
    trust.sign(path)


# ---------------------------------------------------------------- training checkpoints


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values."""
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [base64.b64encode(s.numpy().tobytes()).decode()
                 for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    as_tensor = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(as_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_tensor(s) for s in state["cuda"]])


@dataclass
class Checkpointer:
    """Saves and finds training checkpoints in `root`, keeping the newest `max_to_keep`."""

    root: str
    max_to_keep: int | None = 3
    rank: int = 0
    barrier: Callable[[], None] = lambda: None  # waits for every rank (no-op in one process)
    # DCP planners of the strategy's tensors (SPMD: torch_xla's, each host its shards).
    save_planner: Callable[[], Any] = _no_planner
    load_planner: Callable[[], Any] = _no_planner
    # Paths besides `root` whose checkpoints may be read unsigned; None: no check (tools
    # reading a run's own checkpoints).
    trusted: list[str] | None = None
    # Only the parameters that train (LoRA: the adapters; the frozen base is rebuilt from
    # the model's own weights on resume).
    trainable_only: bool = False

    @property
    def _options(self) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=self.trainable_only)

    def step_path(self, step: int, tmp: bool = False) -> str:
        name = f"{STEP_PREFIX}{step:08d}"
        return f"{self.root.rstrip('/')}/{TMP_PREFIX if tmp else ''}{name}"

    def complete_steps(self) -> list[int]:
        fs, root = _fs(self.root)
        if not fs.isdir(root):
            return []
        steps = []
        for entry in fs.ls(root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(STEP_PREFIX) and fs.exists(f"{entry}/{COMPLETE}"):
                steps.append(int(name.removeprefix(STEP_PREFIX)))
        return sorted(steps)

    def latest(self) -> str | None:
        steps = self.complete_steps()
        return self.step_path(steps[-1]) if steps else None

    def clean_partial(self) -> None:
        """Remove what an interrupted save left behind (never a complete checkpoint)."""
        fs, root = _fs(self.root)
        if self.rank != 0 or not fs.isdir(root):
            return
        for entry in fs.ls(root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            incomplete = name.startswith(STEP_PREFIX) and not fs.exists(f"{entry}/{COMPLETE}")
            if name.startswith(TMP_PREFIX) or incomplete:
                log.warning("removing an incomplete checkpoint left by an interrupted save: %s",
                            entry)
                fs.rm(entry, recursive=True)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any], rank_state: dict[str, Any] | None = None,
             extra: dict[str, torch.nn.Module] | None = None) -> str:
        """`trainer_state` is shared (written by rank 0), `rank_state` is this rank's own
        (with its RNG states, in `rank<R>.json`); `extra`: more models whose weights change
        in training (a synced reference), saved under their names."""
        final, tmp = self.step_path(step), self.step_path(step, tmp=True)
        fs, _ = _fs(self.root)
        try:
            fs.makedirs(_fs(tmp)[1], exist_ok=True)
            model_sd, optim_sd = get_state_dict(model, optimizer, options=self._options)
            others = {k: get_model_state_dict(m) for k, m in (extra or {}).items()}
            dcp.save({"model": model_sd, "optim": optim_sd, **others},
                     storage_writer=_writer(tmp), planner=self.save_planner())
            with fs.open(f"{_fs(tmp)[1]}/rank{self.rank}.json", "w") as f:
                json.dump({"rng": rng_state(), **(rank_state or {})}, f)
            self.barrier()  # every rank's files are in place before the marker
            if self.rank == 0:
                trust.sign(tmp)
                with fs.open(f"{_fs(tmp)[1]}/trainer_state.json", "w") as f:
                    json.dump(trainer_state, f)
                with fs.open(f"{_fs(tmp)[1]}/{COMPLETE}", "w") as f:
                    f.write(f"step {step}\n")
                if fs.exists(_fs(final)[1]):
                    fs.rm(_fs(final)[1], recursive=True)
                fs.mv(_fs(tmp)[1], _fs(final)[1], recursive=True)
        except STORAGE_ERRORS as err:
            if self.rank == 0 and fs.exists(_fs(tmp)[1]):
                fs.rm(_fs(tmp)[1], recursive=True)
            last = self.latest()
            kept = f"the last good checkpoint {last} is untouched" if last else (
                "no earlier checkpoint exists")
            raise CheckpointError(
                f"cannot write checkpoint {final}: {_first_line(err)}; {kept}; free space or "
                "set checkpoint.dir to a writable place") from None
        self.prune()
        self.barrier()  # nobody goes on before the checkpoint is in place
        return final

    def remove_all(self) -> None:
        fs, _ = _fs(self.root)
        if self.rank == 0:
            for step in self.complete_steps():
                log.warning("overwrite=true: deleting checkpoint %s", self.step_path(step))
                fs.rm(_fs(self.step_path(step))[1], recursive=True)

    def prune(self) -> None:
        if self.rank != 0 or not self.max_to_keep:
            return
        fs, _ = _fs(self.root)
        for step in self.complete_steps()[:-self.max_to_keep]:
            fs.rm(_fs(self.step_path(step))[1], recursive=True)

    def load(self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             extra: dict[str, torch.nn.Module] | None = None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore model and optimizer in place and this rank's RNG; return (trainer_state,
        this rank's state). Resume on as many ranks as saved."""
        fs, root = _fs(path)
        if not fs.exists(f"{root}/{COMPLETE}"):
            raise CheckpointError(f"resume={path}: not a complete moedpo checkpoint (no "
                                  f"{COMPLETE} marker)")
        if self.trusted is not None:
            trust.check(path, [self.root, *self.trusted], "resume")
        rank_file = f"{root}/rank{self.rank}.json"
        if not fs.exists(rank_file):
            raise CheckpointError(f"resume={path}: has no state for rank {self.rank}; resume "
                                  "on as many processes as the run that saved it")
        try:
            with fs.open(f"{root}/trainer_state.json") as f:
                trainer_state = json.load(f)
            with fs.open(rank_file) as f:
                rank_state = json.load(f)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"resume={path}: its state files are unreadable "
                                  f"({_first_line(err)})") from None
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self._options)
        extra = extra or {}
        state = {"model": model_sd, "optim": optim_sd,
                 **{k: get_model_state_dict(m) for k, m in extra.items()}}
        try:
            dcp.load(state, storage_reader=_reader(path), planner=self.load_planner())
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"],
                           options=StateDictOptions(strict=not self.trainable_only,
                                                    ignore_frozen_params=self.trainable_only))
            for key, other in extra.items():
                set_model_state_dict(other, state[key], options=StateDictOptions(strict=True))
        except (Exception, CheckpointException) as err:  # DCP wraps errors in several types
            n_params = sum(p.numel() for p in model.parameters())
            raise CheckpointError(
                f"resume={path}: cannot load it into this model ({type(model).__name__}, "
                f"{n_params / 1e6:.2f}M parameters) and optimizer "
                f"({type(optimizer).__name__}): {_first_line(err)}") from None
        set_rng_state(rank_state.pop("rng"))
        return trainer_state, rank_state

    def load_newest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, torch.nn.Module] | None = None,
                    ) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
        """The newest complete checkpoint that loads (resume=auto): one that is torn (a
        truncated .distcp, a bad .metadata, an empty state file) is passed over with a
        warning for the one before it. If none loads, the newest one's error is raised: a
        checkpoint of another model or optimizer fails alike at every step. None if there
        is no checkpoint."""
        steps = self.complete_steps()
        first_error = None
        for step in reversed(steps):
            path = self.step_path(step)
            try:
                trainer_state, rank_state = self.load(path, model, optimizer, extra)
            except CheckpointError as err:
                first_error = first_error or err
                log.warning("cannot resume from %s (%s); trying the checkpoint before it",
                            path, err)
                continue
            return path, trainer_state, rank_state
        if first_error is not None:
            raise first_error
        return None
