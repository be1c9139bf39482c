"""The models of a run, for its backend: the tokenizer, policy and reference built (on the
meta device when sharded), sharded by FSDP2 or SPMD annotations, checkpointed and compiled
per layer as configured, and filled with their starting weights. `trainer.py` is the loop
that uses them; what parallelism and adapters add to a model is applied here, in one place.
"""

from __future__ import annotations

import logging

import torch

from .checkpoint import restore_weights
from .config import DPOConfig
from .losses import loss_names, needs_reference
from .models import lora
from .models.load import (
    build_models,
    check_hub_kernels,
    check_vocab,
    initial_model,
    load_tokenizer,
    materialize,
)
from .parallel import expert, fsdp, spmd
from .parallel.backend import Backend
from .parallel.layers import checkpoint_decoder_layers, compile_decoder_layers, layer_classes
from .validate import use_meta_init

log = logging.getLogger("moedpo")


def load_models(cfg: DPOConfig, backend: Backend):
    """(tokenizer, policy, reference) placed for `backend` (FSDP2- or SPMD-sharded); reference
    is None for reference-free DPO. With meta init the models are sharded while still
    weightless, then each process fills only its own shards (docs/scaling.md, "Loading at
    scale")."""
    tokenizer = load_tokenizer(cfg.model)
    meta = use_meta_init(cfg, backend.kind, backend.distributed)
    # No loss reads the reference (SimPO, ORPO, reference-free DPO...): none is built.
    with_reference = needs_reference(loss_names(cfg.loss.name), cfg.loss.reference_free)
    policy, reference = build_models(cfg.model, cfg.seed, backend.kind == "xla", on_meta=meta,
                                     with_reference=with_reference)
    check_vocab(tokenizer, policy, cfg.model.tokenizer_name_or_path)
    # Moved and filled in place; a LoRA reference is the policy itself.
    models = [m for m in (policy, reference)
              if m is not None and not isinstance(m, lora.AdaptersOff)]
    if not meta:
        if cfg.checkpoint_manager_path:
            restored = restore_weights(cfg.checkpoint_manager_path, models,
                                       trusted=list(cfg.checkpoint.trusted_paths),
                                       key_of=base_keys(cfg))
            log.info("restored weights of policy and reference from %s", restored)
        for model in models:
            model.to(backend.device)
    elif backend.kind == "xla":  # SPMD annotates device tensors: storage first (still empty)
        for model in models:
            materialize(model, backend.device)
    policy, reference = place_models(cfg, backend, policy, reference)
    if meta:
        load_sharded_weights(cfg, backend, models)
    for model in (policy, reference):  # placed on the device as they will train
        if model is not None and not isinstance(model, lora.AdaptersOff):
            check_hub_kernels(model, cfg.model.hub_kernels)
    return tokenizer, policy, reference


def place_models(cfg: DPOConfig, backend: Backend, policy: torch.nn.Module,
                 reference: torch.nn.Module | None):
    """Shard for the backend: SPMD annotations on XLA, FSDP2 under torchrun, else as is;
    before that, the decoder layers checkpointed (policy) and compiled, when configured."""
    checkpoint_layers = cfg.model.activation_checkpointing
    if checkpoint_layers is None:
        checkpoint_layers = (cfg.model.fsdp_config.xla_fsdp_grad_ckpt
                             and (backend.kind == "xla" or backend.distributed))
    ep = cfg.parallel.expert_parallel
    if backend.kind == "xla":  # torch_xla's own checkpoint (see parallel/spmd.py)
        if ep > 1:
            expert.check_expert_count(policy, ep)
        classes = layer_classes(policy, cfg)
        every = cfg.model.activation_checkpointing_every if checkpoint_layers else 0
        policy = spmd.shard_model(policy, backend.mesh, classes, every)
        if reference is not None:
            reference = spmd.shard_model(reference, backend.mesh, classes)
        return policy, reference
    if checkpoint_layers:
        checkpoint_decoder_layers(policy, cfg.model.activation_checkpointing_every)
    if cfg.model.compile:
        for model in (policy, reference):
            if model is not None and not isinstance(model, lora.AdaptersOff):
                compile_decoder_layers(model, cfg)
    if backend.distributed:
        policy = fsdp.shard(policy, cfg, cfg.model.policy_dtype)
        if reference is not None and not isinstance(reference, lora.AdaptersOff):
            reference = fsdp.shard(reference, cfg, cfg.model.reference_dtype,
                                   cpu_offload=cfg.reference.cpu_offload)
    return policy, reference


def base_keys(cfg: DPOConfig):
    """How a policy's keys read a full model's checkpoint: as they are, or (LoRA) the base's
    key of each PEFT key, the adapters left as initialised."""
    return lora.base_key if lora.is_enabled(cfg.model) else None


def load_sharded_weights(cfg: DPOConfig, backend: Backend, models: list[torch.nn.Module]) -> None:
    """Weights into meta-built, already sharded models: from `checkpoint_manager_path` each
    process reads only its shards; otherwise one process builds the starting weights once and
    the others receive their shards from it."""
    if backend.kind != "xla":  # FSDP2 allocates only each rank's shards
        for model in models:
            materialize(model, backend.device)
    if cfg.checkpoint_manager_path:
        restored = restore_weights(cfg.checkpoint_manager_path, models, backend.kind == "xla",
                                   list(cfg.checkpoint.trusted_paths), key_of=base_keys(cfg))
        log.info("restored weights of policy and reference from %s (each process its shards)",
                 restored)
        if lora.is_enabled(cfg.model):  # the checkpoint holds no adapter: drawn here
            lora.init_adapters(models[0], cfg.model, cfg.seed)  # the policy comes first
        return
    full = None
    if backend.is_main:  # LoRA: the base and its adapters, initialised as one process does
        full = (build_models(cfg.model, cfg.seed, backend.kind == "xla",
                             with_reference=False)[0] if lora.is_enabled(cfg.model)
                else initial_model(cfg.model, cfg.seed, backend.kind == "xla")).state_dict()
    for model in models:
        if backend.distributed:
            fsdp.load_from_rank0(model, full)
        else:
            model.load_state_dict(full)
