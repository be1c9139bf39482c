"""The models of a run: the tokenizer, policy and reference built (on the meta device when
sharded), placed by the run's parallel strategy (parallel/strategy.py: sharded, checkpointed
and compiled per layer as configured), and filled with their starting weights. `trainer.py`
is the loop that uses them.
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
from .parallel import Strategy
from .validate import use_meta_init

log = logging.getLogger("moedpo")


def load_models(cfg: DPOConfig, parallel: Strategy):
    """(tokenizer, policy, reference) placed by the run's strategy (sharded or whole);
    reference is None for reference-free DPO. With meta init the models are sharded while
    still weightless, then each process fills only its own shards (docs/scaling.md, "Loading
    at scale")."""
    backend = parallel.backend
    tokenizer = load_tokenizer(cfg.model)
    meta = use_meta_init(cfg, type(parallel))
    # No loss reads the reference (SimPO, ORPO, reference-free DPO...): none is built.
    with_reference = needs_reference(loss_names(cfg.loss.name), cfg.loss.reference_free)
    policy, reference = build_models(cfg.model, cfg.seed, backend.kind == "xla", on_meta=meta,
                                     with_reference=with_reference)
    check_vocab(tokenizer, policy, cfg.model.tokenizer_name_or_path)
    # Moved and filled in place; a LoRA reference is the policy itself.
    models = own_models(policy, reference)
    if not meta:
        if cfg.checkpoint_manager_path:
            restored = restore_weights(cfg.checkpoint_manager_path, models,
                                       trusted=list(cfg.checkpoint.trusted_paths),
                                       key_of=base_keys(cfg))
            log.info("restored weights of policy and reference from %s", restored)
        for model in models:
            model.to(backend.device)
    elif parallel.storage_before_sharding:  # (still empty)
        for model in models:
            materialize(model, backend.device)
    policy, reference = place_models(parallel, policy, reference)
    if meta:
        load_sharded_weights(cfg, parallel, models)
    for model in own_models(policy, reference):  # placed on the device as they will train
        check_hub_kernels(model, cfg.model.hub_kernels)
    return tokenizer, policy, reference


def own_models(policy: torch.nn.Module,
               reference: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The models that hold weights of their own: a LoRA reference is the policy itself."""
    return [m for m in (policy, reference)
            if m is not None and not isinstance(m, lora.AdaptersOff)]


def place_models(parallel: Strategy, policy: torch.nn.Module,
                 reference: torch.nn.Module | None):
    """Both models as the strategy shards them (the policy trains, the reference does not)."""
    policy = parallel.shard(policy, "policy")
    if reference is not None and not isinstance(reference, lora.AdaptersOff):
        reference = parallel.shard(reference, "reference")
    return policy, reference


def base_keys(cfg: DPOConfig):
    """How a policy's keys read a full model's checkpoint: as they are, or (LoRA) the base's
    key of each PEFT key, the adapters left as initialised."""
    return lora.base_key if lora.is_enabled(cfg.model) else None


def load_sharded_weights(cfg: DPOConfig, parallel: Strategy,
                         models: list[torch.nn.Module]) -> None:
    """Weights into meta-built, already sharded models: from `checkpoint_manager_path` each
    process reads only its shards; otherwise one process builds the starting weights once and
    the strategy hands the others their shards."""
    backend = parallel.backend
    if not parallel.storage_before_sharding:  # only each rank's shards are allocated
        for model in models:
            materialize(model, backend.device)
    if cfg.checkpoint_manager_path:
        restored = restore_weights(cfg.checkpoint_manager_path, models, parallel.load_planner,
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
        parallel.fill(model, full)
