"""`moedpo export` and `moedpo convert`: between moedpo checkpoints and Hugging Face folders.

- export: a run (or one of its checkpoints) -> an HF folder (safetensors, config, tokenizer)
  that `AutoModelForCausalLM.from_pretrained` loads, with the trained policy's weights.
- convert: an HF folder -> a DCP weights checkpoint for `checkpoint_manager_path`, and back.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checkpoint import COMPLETE, Checkpointer, CheckpointError, restore_weights, save_weights
from .config import DTYPES, DPOConfig, ModelConfig
from .data.pairs import DataError
from .data.templates import use_chat_template
from .models import lora
from .models.load import build_models, load_tokenizer
from .models.precision import cast_parameters
from .trust import UntrustedCheckpoint

log = logging.getLogger("moedpo")


def load_run_config(run_dir: Path) -> DPOConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no config.yaml; give a moedpo run directory or one "
                              "of its checkpoints (run_dir/checkpoints/step_...)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DPOConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as err:  # a hand-edited or crafted file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a moedpo run config ({first})") from None


def read_weights(path: str, models: list[torch.nn.Module], trust: bool, **kwargs) -> str:
    """restore_weights for export and convert. The folder may come from anywhere, and its
    config.yaml too (so not its checkpoint.trusted_paths): only checkpoints signed by this
    machine's key are read, unless the user vouches for them (`--trust`)."""
    try:
        return restore_weights(path, models, trusted=None if trust else [], **kwargs)
    except UntrustedCheckpoint as err:
        raise UntrustedCheckpoint(f"{err}; or pass --trust") from None


def find_checkpoint(source: Path) -> tuple[DPOConfig, str]:
    """(run config, checkpoint path) from a run dir or a checkpoint folder inside one."""
    if (source / COMPLETE).exists():
        return load_run_config(source.parent.parent), str(source)
    cfg = load_run_config(source)
    # The folder given, wherever it now lies (its config.yaml names where it was written);
    # a run whose checkpoint.dir was elsewhere keeps them there.
    root = str(source / "checkpoints") if (source / "checkpoints").is_dir() \
        else cfg.checkpoint_dir
    latest = Checkpointer(root).latest()
    if latest is None:
        raise CheckpointError(f"{source}: no complete checkpoint in {root}")
    return cfg, latest


def save_hf(model: torch.nn.Module, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def export(source: Path, out: Path, merge: bool = False, trust: bool = False) -> str:
    """Write the policy of a run's checkpoint as an HF folder; returns the checkpoint used.
    A LoRA run's checkpoint holds only its adapters: they are put back on the base (the
    run's own starting weights), and written as a PEFT adapter folder, or with `merge`
    folded into the weights as a plain HF model."""
    cfg, checkpoint = find_checkpoint(source)
    if cfg.model.trust_remote_code and not trust:
        raise CheckpointError(f"{source}: its config.yaml sets model.trust_remote_code=true, "
                              "so exporting runs the model's own code; pass --trust if you "
                              "trust the run folder and that model")
    adapters = lora.is_enabled(cfg.model)
    if merge and not adapters:
        raise CheckpointError(f"{source}: --merge merges LoRA adapters, and this run trained "
                              "the full model (model.lora.r=0); export it without --merge")
    # QLoRA's adapters go on the unquantized base (merged, or beside it), as QLoRA ships them.
    cfg.model.lora.quantize = None
    policy, _ = build_models(cfg.model, cfg.seed, with_reference=False)
    if cfg.checkpoint_manager_path:  # the run's base came from there, not from name_or_path
        read_weights(cfg.checkpoint_manager_path, [policy], trust,
                     key_of=lora.base_key if adapters else None)
    read_weights(checkpoint, [policy], trust, trainable_only=adapters)
    tokenizer = load_tokenizer(cfg.model)
    try:  # the template the run trained with goes with the model
        use_chat_template(tokenizer, cfg.data.chat_template)
    except DataError as err:
        log.warning("%s; the export keeps the tokenizer's own chat template", err)
    if adapters and merge:  # W + scale * B A in float32, then the policy's dtype
        policy = cast_parameters(policy, torch.float32).merge_and_unload()
    elif adapters:  # adapter_config.json + adapter_model.safetensors, for PeftModel
        save_adapters(policy, cfg, tokenizer, out)
        return checkpoint
    # In the dtype the policy computed in (mixed precision trains float32 masters).
    save_hf(cast_parameters(policy, DTYPES[cfg.model.policy_dtype]), tokenizer, out)
    return checkpoint


def save_adapters(policy: torch.nn.Module, cfg: DPOConfig, tokenizer, out: Path) -> None:
    """A PEFT adapter folder that applies to the base it names. PiSSA/OLoRA trained on the
    residual W - B0 A0: PEFT's conversion rewrites them as a rank-2r LoRA on the original W
    (B A - B0 A0), from the initial adapters rebuilt here (same seed, same init)."""
    cast_parameters(policy, DTYPES[cfg.model.policy_dtype])
    out.mkdir(parents=True, exist_ok=True)
    base = cfg.model.name_or_path if not cfg.model.config_path else None
    if cfg.checkpoint_manager_path:  # named as is: loading it as a model id fails loudly
        base = cfg.checkpoint_manager_path
        log.warning("the adapters belong to the base in checkpoint_manager_path=%s, which no "
                    "model id names: make it a Hugging Face folder with `moedpo convert --to-hf "
                    "%s BASE_DIR --model %s` and load the adapters on BASE_DIR (or export with "
                    "--merge)", cfg.checkpoint_manager_path, cfg.checkpoint_manager_path,
                    cfg.model.config_path or cfg.model.name_or_path)
    policy.peft_config["default"].base_model_name_or_path = base
    if not lora.rewrites_base(cfg.model):
        policy.save_pretrained(str(out), safe_serialization=True)
    else:
        with tempfile.TemporaryDirectory() as initial:
            start, _ = build_models(cfg.model, cfg.seed, with_reference=False)
            cast_parameters(start, DTYPES[cfg.model.policy_dtype])
            start.peft_config["default"].init_lora_weights = True  # as PEFT's conversion asks
            start.save_pretrained(initial, safe_serialization=True)
            policy.save_pretrained(str(out), safe_serialization=True,
                                   path_initial_model_for_weight_conversion=initial)
    tokenizer.save_pretrained(str(out))


def hf_to_dcp(model_dir: str, out: str, dtype: str = "float32") -> None:
    model, _ = build_models(ModelConfig(name_or_path=model_dir, policy_dtype=dtype,
                                        reference_dtype=dtype, mixed_precision=False))
    save_weights(model, out)


def dcp_to_hf(checkpoint: str, out: Path, model: ModelConfig, trust: bool = False) -> None:
    policy, _ = build_models(model)
    read_weights(checkpoint, [policy], trust)
    save_hf(policy, load_tokenizer(model), out)
