"""Weights from torch.distributed.checkpoint (DCP) folders.

`checkpoint_manager_path` keeps the original's meaning: a folder (local or any fsspec URL,
e.g. gs://) written by a checkpoint manager, holding one DCP checkpoint per step in numbered
sub-folders (`PATH/<step>/`), or a single DCP checkpoint. Its state dict is
`{"model": <Hugging Face state_dict>}`; the newest step is restored into both models.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp


class CheckpointError(RuntimeError):
    pass


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def latest_checkpoint(path: str) -> str:
    """`path` itself if it is a DCP checkpoint, else its highest-numbered step folder."""
    fs, root = _fs(path)
    if fs.exists(f"{root}/.metadata"):
        return path
    if not fs.isdir(root):
        raise CheckpointError(f"checkpoint_manager_path={path}: no such folder")
    steps = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    steps = sorted(int(s) for s in steps if s.isdigit() and fs.exists(f"{root}/{s}/.metadata"))
    if not steps:
        raise CheckpointError(f"checkpoint_manager_path={path}: holds no DCP checkpoint "
                              "(a .metadata file, or numbered step folders with one)")
    return f"{path.rstrip('/')}/{steps[-1]}"


def _reader(path: str) -> dcp.StorageReader:
    if "://" in path and not path.startswith("file://"):
        from torch.distributed.checkpoint import FsspecReader

        return FsspecReader(path)
    return dcp.FileSystemReader(path.removeprefix("file://"))


def restore_weights(path: str, models: list[torch.nn.Module]) -> str:
    """Load the newest checkpoint under `path` into every model (each keeps its dtype)."""
    checkpoint = latest_checkpoint(path)
    for model in models:
        state = {"model": model.state_dict()}
        try:
            dcp.load(state, storage_reader=_reader(checkpoint))
        except Exception as err:  # DCP wraps planner/storage errors in several types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"checkpoint_manager_path={path}: cannot restore "
                                  f"{checkpoint} into the model: {first}") from None
        model.load_state_dict(state["model"])
    return checkpoint


def save_weights(model: torch.nn.Module, path: str) -> None:
    """Write `{"model": state_dict}` as a DCP checkpoint (the restore format above)."""
    dcp.save({"model": model.state_dict()}, checkpoint_id=path)
