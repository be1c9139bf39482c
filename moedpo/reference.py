"""Reference log-probs computed once, cached on disk, and the reference model let go.

DPO's reference term depends only on the frozen reference model and the data, so with
`reference.precompute=true` the reference runs once over the train and eval pairs, each pair
keeps its two summed log-probs, and training never runs (or holds) the reference again.

The cache file is named by a hash of everything the values depend on: the tokenised pairs
themselves (which covers the data, the tokenizer and every truncation setting), where the
reference's weights come from, by content where that is cheap (the model JSON's and
`config.json`'s contents, the hub revision resolved to its commit in the local cache; for
weight files, too large to hash at every start, their names, sizes and modification
times; the JSON model's init seed, `checkpoint_manager_path`), what the built reference is,
read from the module (`reference_identity`: dtypes, adapters off, quantization, kernels,
attention, MoE implementation and capacity), and the padding; with the dropped MoE and
dynamic padding also the batch geometry (a sequence's capacity follows its batch's padded
length). A changed
setting gives a new name, so a stale cache is never read. Files are safetensors (no
pickle), written atomically.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import DPOConfig, is_url
from .data import DataBundle, TokenizedPair, eval_indices
from .data.collate import PadTo
from .models import lora
from .private_api import attention_implementation, experts_implementation
from .step import batch_logps

log = logging.getLogger("moedpo")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".metadata", ".gguf")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_stamp(path: str | Path | None) -> list | None:
    """A local model or checkpoint folder (or file): each weight file's name, size and
    modification time (retrained weights in place change the key), every other file's
    contents hashed (config.json, generation and tokenizer files); None for hub ids and
    remote paths."""
    if not path or not Path(path).exists():
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    stamp = []
    for p in files:
        name = str(p.relative_to(root)) if p != root else p.name
        if p.suffix in WEIGHT_SUFFIXES or p.stat().st_size > 64 << 20:
            stamp.append([name, p.stat().st_size, p.stat().st_mtime_ns])
        else:
            stamp.append([name, _sha256(p)])
    return stamp


def _hub_snapshot(name: str, revision: str | None) -> Path | None:
    """The local hub-cache folder of `name` at `revision` (its name is the commit), looked
    up offline; None when `name` is not a cached hub model."""
    if Path(name).exists() or "://" in name:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except Exception:  # not cached, not a repo id: nothing to stamp
        return None


def _model_fields(cfg: DPOConfig) -> dict:
    """Where the reference's starting weights come from, by content where that is cheap."""
    from .config import resolve_model_json

    m = cfg.model
    if m.config_path:
        return {"config_json": _sha256(resolve_model_json(m.config_path)),
                "init_seed": cfg.seed}
    snapshot = _hub_snapshot(m.name_or_path, m.revision)
    return {"model": m.name_or_path, "revision": m.revision,
            "commit": snapshot.name if snapshot else None,
            "model_files": _folder_stamp(snapshot or m.name_or_path)}


def data_digest(pairs: list[TokenizedPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        ids = [*pair.prompt, -1, *pair.chosen, -2, *pair.rejected, -3]
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _plain(value) -> bool:
    return isinstance(value, bool | int | float | str) or value is None


def reference_identity(reference: torch.nn.Module) -> dict:
    """What the built reference computes, read from the module itself rather than from the
    settings that made it, so no setting can be left out of the key: its class and config
    (attention and experts implementations included), whether it is a LoRA policy with its
    adapters off, Hub kernels, quantization, every parameter's and buffer's name, dtype and
    shape (the dtype it computes in; 4-bit weights show as uint8), moedpo's per-module
    settings (MoE capacity, rounding, padding) and which modules run in train mode."""
    adapters_off = isinstance(reference, lora.AdaptersOff)
    model = reference.policy if adapters_off else reference
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version") and _plain(v)}
    tensors = [[name, str(t.dtype), list(t.shape)] for name, t in
               itertools.chain(model.named_parameters(), model.named_buffers())
               if not (adapters_off and ("lora_" in name or ".modules_to_save." in name))]
    settings = {name: {k: v for k, v in vars(m).items() if k.startswith("moedpo_") and _plain(v)}
                for name, m in model.named_modules()}
    return {
        "class": type(model).__name__, "adapters_off": adapters_off, "config": config,
        "attention": attention_implementation(model),
        "experts": experts_implementation(model),
        "hub_kernels": bool(getattr(model, "use_kernels", False)),
        "quantization": str(getattr(model.config, "quantization_config", None)),
        "tensors": tensors, "modules": {k: v for k, v in settings.items() if v},
        "training": sorted(name for name, m in model.named_modules() if m.training),
    }


def cache_fields(cfg: DPOConfig, data: DataBundle, pad_to: PadTo, reference: torch.nn.Module,
                 devices: int = 1) -> dict:
    m = cfg.model
    dropped = m.capacity_factor > 0 and m.moe_implementation in ("auto", "dropped")
    return {
        "train_pairs": data_digest(data.train), "eval_pairs": data_digest(data.eval),
        # Where the starting weights come from, then what the built reference is.
        **_model_fields(cfg),
        "checkpoint_manager_path": cfg.checkpoint_manager_path,
        "checkpoint_files": _folder_stamp(cfg.checkpoint_manager_path),
        "reference": reference_identity(reference),
        # The dropped MoE's capacity depends on each batch's padded length, so on which
        # pairs share a batch: the precompute batch and how many devices split it.
        "batch": [cfg.eval_batch_size, devices] if dropped and pad_to is None else None,
        "pad_to": pad_to, "label_pad_token_id": cfg.label_pad_token_id,
        "matmul_precision": torch.get_float32_matmul_precision(),
        "ld_alpha": cfg.loss.ld_alpha,
    }


def cache_path(cfg: DPOConfig, fields: dict) -> str:
    """A local path or a URL (reference.cache_dir, or output_dir/reference_cache, may be
    gs://...)."""
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    folder = cfg.reference.cache_dir or f"{cfg.output_dir.rstrip('/')}/reference_cache"
    name = f"reference_logps-{key}.safetensors"
    return f"{folder.rstrip('/')}/{name}" if is_url(folder) else str(
        Path(folder.removeprefix("file://")).expanduser() / name)


@torch.no_grad()
def compute(reference: torch.nn.Module, pairs: list[TokenizedPair], to_batch, batch_size: int,
            backend, label_pad: int, progress=None) -> torch.Tensor:
    """[pairs, 2] float64 (chosen, rejected) summed log-probs; ranks split the pairs and the
    result is summed over ranks (each pair is filled by exactly one)."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    batches = eval_indices(len(pairs), batch_size, backend.rank, backend.world_size)
    if progress is not None:
        batches = progress(batches, -(-len(pairs) // (batch_size * backend.world_size)))
    for idx, valid in batches:
        logps, _ = batch_logps(reference, to_batch([pairs[i] for i in idx]), label_pad)
        backend.sync()
        values = logps.logps.detach().cpu().double().view(2, len(idx)).T  # rows: chosen, rejected
        out[idx[:valid]] = values[:valid]
    return backend.all_reduce_sum(out)


def _read(path: str, fields: dict, n_train: int, n_eval: int) -> dict[str, torch.Tensor] | None:
    if is_url(path):  # safetensors reads local files: fetch a remote one first
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path)
        if not fs.exists(remote):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "cache.safetensors")
            fs.get_file(remote, local)
            return _read(local, fields, n_train, n_eval)
    if not os.path.exists(path):
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if json.loads(f.metadata().get("fields", "{}")) != fields:
                return None
            values = {split: f.get_tensor(split) for split in ("train", "eval")}
    except (OSError, ValueError, SafetensorError) as err:
        log.warning("ignoring unreadable reference cache %s: %s", path, err)
        return None
    if values["train"].shape != (n_train, 2) or values["eval"].shape != (n_eval, 2):
        return None
    return values


def _write(path: str, values: dict[str, torch.Tensor], fields: dict) -> None:
    tensors = {k: v.contiguous() for k, v in values.items()}
    metadata = {"fields": json.dumps(fields, sort_keys=True)}
    if is_url(path):  # one object upload: whole or not at all
        import fsspec

        fs, remote = fsspec.core.url_to_fs(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "cache.safetensors")
            save_file(tensors, local, metadata=metadata)
            fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(local, remote)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, target)


def attach(pairs: list[TokenizedPair], values: torch.Tensor) -> list[TokenizedPair]:
    return [replace(p, reference=(float(c), float(r))) for p, (c, r) in zip(pairs, values.tolist(),
                                                                            strict=True)]


def precompute(cfg: DPOConfig, data: DataBundle, reference: torch.nn.Module, to_batch,
               pad_to: PadTo, backend, progress=None) -> DataBundle:
    """`data` with every pair's reference log-probs attached, from the cache when it holds
    them, else computed now (and cached by the main process)."""
    fields = cache_fields(cfg, data, pad_to, reference, backend.total_devices)
    path = cache_path(cfg, fields)
    values = _read(path, fields, len(data.train), len(data.eval))
    # Every rank must agree, or some would wait in a collective the others skip.
    hits = float(backend.all_reduce_sum(torch.tensor([float(values is not None)]))[0])
    if hits == backend.world_size:
        log.info("reference log-probs from cache %s", path)
    else:
        started = time.perf_counter()
        batch = cfg.eval_batch_size * backend.devices
        values = {split: compute(reference, pairs, to_batch, batch, backend,
                                 cfg.label_pad_token_id, progress)
                  for split, pairs in (("train", data.train), ("eval", data.eval))}
        if backend.is_main:
            _write(path, values, fields)
        backend.barrier()
        log.info("reference log-probs of %d train and %d eval pairs computed in %.1f s, cached "
                 "in %s", len(data.train), len(data.eval), time.perf_counter() - started, path)
    return replace(data, train=attach(data.train, values["train"]),
                   eval=attach(data.eval, values["eval"]))
