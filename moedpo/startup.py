"""What a run is about to do, logged once before the first step: model size, backend,
data sources, what tokenisation truncated or skipped, and the step plan."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import torch

from .config import DPOConfig, LossConfig
from .losses import LOSSES, describe, unread_options
from .models import lora
from .models.moe import experts_modules, moe_top_k
from .models.precision import is_mixed
from .parallel import Strategy
from .step import loss_terms

log = logging.getLogger("moedpo")


def log_startup(cfg: DPOConfig, policy: torch.nn.Module, data, n_steps: int,
                parallel: Strategy, run_dir: Path) -> None:
    backend = parallel.backend
    n_params = sum(p.numel() for p in policy.parameters())  # DTensors count globally
    top_k = moe_top_k(policy)
    active = n_params
    if top_k:  # each token runs k of E experts
        experts = experts_modules(policy)
        per_expert = sum(p.numel() for m in experts for p in m.parameters())
        active -= per_expert * (1 - top_k / experts[0].down_proj.shape[0])
    source = cfg.model.config_path or cfg.model.name_or_path
    precision = " (mixed: float32 master weights)" if is_mixed(cfg.model) else ""
    reference = ("the policy with its adapters off (LoRA)" if lora.is_enabled(cfg.model)
                 and not lora.rewrites_base(cfg.model) else
                 f"{cfg.model.reference_dtype}, a copy of the base (model.lora.init="
                 f"{cfg.model.lora.init} rewrites the policy's base)" if lora.is_enabled(cfg.model)
                 else cfg.model.reference_dtype)
    log.info("model %s: %.2fM parameters (%.2fM active per token), policy %s%s, reference %s",
             source, n_params / 1e6, active / 1e6, cfg.model.policy_dtype, precision, reference)
    log.info("backend %s, %d process(es), %d device(s) per batch, device %s; strategy %s",
             backend.kind, backend.world_size, backend.devices, backend.device, parallel.name)
    for line in parallel.describe(policy):
        log.info("%s", line)
    for name, (n_train, n_eval) in data.sources.items():
        formats = ", ".join(data.formats.get(name, {})) or "generated"
        log.info("data %s: %d train pairs, %d eval pairs (%s)", name, n_train, n_eval, formats)
    if data.skipped.total:
        log.warning("skipped %d rows: %s; first: %s", data.skipped.total,
                    dict(data.skipped.counts), "; ".join(data.skipped.examples))
    stats = data.tokenized
    if stats.counts:
        log.info("truncated: %s", dict(stats.counts))
    if stats.boundary:
        log.warning("%d pairs: the prompt's ids are not a prefix of prompt+response's (tokens "
                    "merge across the boundary, or the chat template renders the prompt alone "
                    "otherwise); the response starts where they diverge. First: %s",
                    stats.boundary, stats.boundary_example)
    if stats.identical:
        log.warning("identical responses: %d pairs have the same chosen and rejected tokens%s",
                    stats.identical, " (skipped: data.skip_identical=true)"
                    if cfg.data.skip_identical else "; data.skip_identical=true leaves them out")
    names, weights = loss_terms(cfg)
    log.info("loss: %s", describe(names, weights))
    defaults = {f.name: f.default for f in fields(LossConfig)}
    for key in unread_options(names, vars(cfg.loss), defaults):
        readers = ", ".join(n for n, spec in LOSSES.items() if key in spec.options)
        log.warning("loss.%s=%s has no effect: loss.name=%s does not read it (%s do)", key,
                    getattr(cfg.loss, key), ",".join(names), readers)
    devices = backend.total_devices
    log.info("%d steps of %d pairs (batch %d x %d devices x accumulation %d); writing to %s",
             n_steps, cfg.per_device_train_batch_size * devices * cfg.gradient_accumulation_steps,
             cfg.per_device_train_batch_size, devices, cfg.gradient_accumulation_steps, run_dir)
