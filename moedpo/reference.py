"""Reference log-probs computed once, cached on disk, and the reference model let go.

DPO's reference term depends only on the frozen reference model and the data, so with
`reference.precompute=true` the reference runs once over the train and eval pairs, each pair
keeps its two summed log-probs, and training never runs (or holds) the reference again.

The cache file is named by a hash of everything the values depend on: the tokenised pairs
themselves (which covers the data, the tokenizer and every truncation setting), where the
reference weights come from (model id and revision, or JSON config and seed, or
checkpoint_manager_path; sizes and modification times of local weight files), its dtype,
attention, MoE implementation and capacity, and the padding. A changed setting gives a new
name, so a stale cache is never read. Files are safetensors (no pickle), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import DPOConfig
from .data import DataBundle, TokenizedPair, eval_indices
from .data.collate import PadTo
from .evaluate import batch_logps

log = logging.getLogger("moedpo")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".distcp", ".metadata")


def _weights_stamp(path: str | None) -> list | None:
    """(file, size, mtime) of the weight files under a local folder, so retrained weights in
    the same folder change the key; None for hub ids and remote paths."""
    if not path or not Path(path).exists():
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                 if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return [[str(p.relative_to(root)) if p != root else p.name, p.stat().st_size,
             p.stat().st_mtime_ns] for p in files]


def data_digest(pairs: list[TokenizedPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        ids = [*pair.prompt, -1, *pair.chosen, -2, *pair.rejected, -3]
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def cache_fields(cfg: DPOConfig, data: DataBundle, pad_to: PadTo) -> dict:
    m = cfg.model
    return {
        "train_pairs": data_digest(data.train), "eval_pairs": data_digest(data.eval),
        "model": m.config_path or m.name_or_path, "revision": m.revision,
        "init_seed": cfg.seed if m.config_path else None,
        "model_files": _weights_stamp(None if m.config_path else m.name_or_path),
        "checkpoint_manager_path": cfg.checkpoint_manager_path,
        "checkpoint_files": _weights_stamp(cfg.checkpoint_manager_path),
        "dtype": m.reference_dtype, "flash_attention": m.flash_attention,
        "moe": [m.moe_implementation, m.capacity_factor, m.capacity_rounding,
                m.moe_ignore_padding],
        "pad_to": pad_to, "label_pad_token_id": cfg.label_pad_token_id,
        "full_precision": cfg.full_precision,
    }


def cache_path(cfg: DPOConfig, fields: dict) -> Path:
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    folder = cfg.reference.cache_dir or os.path.join(cfg.output_dir, "reference_cache")
    return Path(folder) / f"reference_logps-{key}.safetensors"


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


def _read(path: Path, fields: dict, n_train: int, n_eval: int) -> dict[str, torch.Tensor] | None:
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


def _write(path: Path, values: dict[str, torch.Tensor], fields: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({k: v.contiguous() for k, v in values.items()}, str(tmp),
              metadata={"fields": json.dumps(fields, sort_keys=True)})
    os.replace(tmp, path)


def attach(pairs: list[TokenizedPair], values: torch.Tensor) -> list[TokenizedPair]:
    return [replace(p, reference=(float(c), float(r))) for p, (c, r) in zip(pairs, values.tolist(),
                                                                            strict=True)]


def precompute(cfg: DPOConfig, data: DataBundle, reference: torch.nn.Module, to_batch,
               pad_to: PadTo, backend, progress=None) -> DataBundle:
    """`data` with every pair's reference log-probs attached, from the cache when it holds
    them, else computed now (and cached by the main process)."""
    fields = cache_fields(cfg, data, pad_to)
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
