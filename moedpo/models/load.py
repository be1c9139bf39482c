"""Build the policy and reference models and the tokenizer.

`model.name_or_path` loads a pretrained model (hub id or local folder) through
`from_pretrained`; `model.config_path` builds one from a JSON config with fresh weights
(transformers' `_init_weights` covers every weight, RMSNorm included). Both models start
from the same weights, each cast to its own dtype; the reference is frozen in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from ..config import ASSETS_DIR, DTYPES, ModelConfig, resolve_model_json
from ..private_api import (
    FLAGGED_ATTENTION,
    causal_lm_class,
    non_persistent_buffers,
    supports_attention,
)
from . import block_attention, chunked_head, lora
from .balance import correction_bias_routers
from .families import deterministic_routing, without_train_noise
from .moe import apply_moe_implementation
from .precision import cast_parameters, storage_dtype
from .router import freeze_routers

log = logging.getLogger(__name__)
EMBEDDED_TOKENIZER = ASSETS_DIR / "tokenizer"


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message says which and how to fix it."""


def _hub_error(what: str, name: str, err: Exception) -> ModelLoadError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(
        f"cannot load {what} '{name}': {first}. Give a local folder, or for a hub id make sure it "
        "is in the hub cache (HF_HOME) and, for gated models, that HF_TOKEN is set in the "
        "environment")


def load_tokenizer(cfg: ModelConfig):
    """From `model.tokenizer_name_or_path`; else the pretrained model's; else (random-init
    models) the embedded one. A missing pad token becomes EOS (padding is masked anyway)."""
    if cfg.tokenizer_name_or_path:
        source = cfg.tokenizer_name_or_path
    elif cfg.config_path:
        source = str(EMBEDDED_TOKENIZER)
    else:
        source = cfg.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error("tokenizer", source, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(cfg: ModelConfig) -> PretrainedConfig:
    if cfg.config_path:
        path = resolve_model_json(cfg.config_path)
        fields = json.loads(path.read_text())
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ModelLoadError(f"model.config_path={path}: the JSON has no 'model_type'")
        fields.pop("architectures", None)
        config = AutoConfig.for_model(model_type, **fields)
    else:
        try:
            config = AutoConfig.from_pretrained(
                cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise _hub_error("model config", cfg.name_or_path, err) from None
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise ModelLoadError(f"model.config_overrides.{key}: {type(config).__name__} has "
                                 "no such field; use one of its attributes (config.json's keys)")
        setattr(config, key, value)
    return without_train_noise(config)


def attention_implementation(cfg: ModelConfig, config: PretrainedConfig | None = None,
                             for_xla: bool = False) -> str:
    """model.attn_implementation resolved for this model. auto: sdpa (fused kernels where
    the device has them; it takes the 4-D masks of prompt sharing and packing) where the
    model class supports it, else eager (gpt-oss, whose attention sinks sdpa lacks). XLA:
    eager (HF's sdpa path reads the mask on the host to choose a kernel, splitting the
    graph). An implementation the class lacks is a one-line error naming what it has."""
    name = cfg.attn_implementation
    if for_xla:
        if name not in ("auto", "eager"):
            log.info("model.attn_implementation=%s: XLA runs eager attention", name)
        return "eager"
    klass = causal_lm_class(config) if config is not None else None
    if name == "auto":
        if not cfg.flash_attention:
            return "eager"
        return "sdpa" if klass is None or supports_attention(klass, "sdpa") else "eager"
    if klass is not None and not supports_attention(klass, name):
        have = ["eager", *(n for n in FLAGGED_ATTENTION if supports_attention(klass, n))]
        raise ModelLoadError(f"model.attn_implementation={name}: {klass.__name__} does not "
                             f"support it; use auto or one of {', '.join(have)}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError("model.attn_implementation=flash_attention_2 needs the flash-attn "
                             "package (CUDA only); install it or use auto (sdpa)")
    return name


def _load_dtype(cfg: ModelConfig) -> torch.dtype:
    # Load or initialise once in the wider dtype, then cast a copy for each role, so the
    # lower-precision model is the rounding of the other and never a second, different init.
    policy_dtype, reference_dtype = storage_dtype(cfg), DTYPES[cfg.reference_dtype]
    return torch.float32 if torch.float32 in (policy_dtype, reference_dtype) else policy_dtype


def initial_model(cfg: ModelConfig, seed: int = 0, for_xla: bool = False,
                  on_meta: bool = False) -> torch.nn.Module:
    """The starting weights, once, in the wider of the two dtypes: pretrained, or freshly
    initialised from `seed`. `on_meta`: the same modules with no storage (shapes only)."""
    config = model_config(cfg)
    dtype = _load_dtype(cfg)
    attn = attention_implementation(cfg, config, for_xla)
    if attn == "sdpa":  # the same SDPA, computing only the unmasked blocks of shared rows
        attn = block_attention.NAME
    if on_meta or cfg.config_path:
        if cfg.config_path:
            torch.manual_seed(seed)
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            return AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn,
                trust_remote_code=cfg.trust_remote_code)
    quantized = {}
    if lora.is_quantized(cfg):  # QLoRA: quantized as it loads; moved to the device later
        dtype = DTYPES[cfg.policy_dtype]
        quantized = dict(quantization_config=lora.quantization(cfg), device_map="cpu")
    try:
        # Hub kernels never come on by themselves (transformers 5.25 defaults use_kernels to
        # true here): set_hub_kernels turns them on for pretrained and built models alike.
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, config=config, dtype=dtype, revision=cfg.revision,
            attn_implementation=attn, trust_remote_code=cfg.trust_remote_code,
            use_kernels=False, **quantized)
    except (OSError, ValueError) as err:
        raise _hub_error("model", cfg.name_or_path, err) from None
    return own_storage(model)


def set_hub_kernels(model: torch.nn.Module, wanted: bool) -> None:
    """`model.hub_kernels`: transformers' Hub kernels on (its `kernels` package swaps layers
    for the device at each train()/eval()) or off, and the model's public `use_kernels` state
    checked against it, so no release can turn them on under moedpo's own layers."""
    if wanted and not getattr(model, "use_kernels", False):
        if not hasattr(model, "set_use_kernels"):
            raise ModelLoadError(f"model.hub_kernels=true: {type(model).__name__} cannot use "
                                 "Hub kernels (this transformers has no set_use_kernels)")
        try:
            model.set_use_kernels(True)
        except (ImportError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"model.hub_kernels=true: {first}; install the kernels "
                                 "package (pip install kernels) or set model.hub_kernels=false"
                                 ) from None
    check_hub_kernels(model, wanted)


def check_hub_kernels(model: torch.nn.Module, wanted: bool) -> None:
    """A one-line error when the model's Hub-kernel state is not what model.hub_kernels says."""
    state = bool(getattr(model, "use_kernels", False))
    if state != wanted:
        raise ModelLoadError(
            f"model.hub_kernels={str(wanted).lower()} but transformers left Hub kernels "
            f"{'on' if state else 'off'} on {type(model).__name__} (USE_HUB_KERNELS="
            f"{os.environ.get('USE_HUB_KERNELS', 'unset')}); unset USE_HUB_KERNELS or set "
            "model.hub_kernels to match")


def own_storage(model: torch.nn.Module) -> torch.nn.Module:
    """Copy the tensors that still point into the memory-mapped safetensors file (those
    from_pretrained did not convert) into memory of their own, one at a time. While one such
    tensor lives, the whole mapping does, and every page of the file that loading read stays
    in the process's resident memory: on the benchmark's tiny Mixtral that is ~50 MB per
    model for 4 MB of tensors. torch-allocated CPU storage is resizable; storage wrapping
    outside memory (a mapped file) is not."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.device.type == "cpu" and not tensor.untyped_storage().resizable():
            tensor.data = tensor.data.clone()
    return model


def build_models(cfg: ModelConfig, seed: int = 0, for_xla: bool = False,
                 on_meta: bool = False, with_reference: bool = True
                 ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(policy, reference) with identical starting weights, on the CPU; the policy's
    parameters in its storage dtype (float32 under mixed precision), the reference's in
    `model.reference_dtype`. `for_xla` rules out
    MoE implementations whose shapes depend on the routing, and uses eager attention (HF's
    sdpa path reads the attention mask on the host to choose a kernel, a sync that splits
    the XLA graph). `on_meta`: both on the meta device, for `materialize` after sharding. Without
    `with_reference` (losses that read none) the reference is None: never copied."""
    model = initial_model(cfg, seed, for_xla, on_meta)
    set_hub_kernels(model, cfg.hub_kernels)
    deterministic_routing(model)
    if on_meta and getattr(model.config, "tie_word_embeddings", False):
        raise ModelLoadError(
            f"model.meta_init=true: {type(model).__name__} ties its input and output "
            "embeddings, which meta-device building does not restore; set model.meta_init=false")
    # Policy and reference always share the MoE implementation and capacity.
    moe = apply_moe_implementation(model, cfg.moe_implementation, cfg.capacity_factor,
                                   cfg.capacity_rounding, cfg.moe_ignore_padding,
                                   static=for_xla)
    if moe != "none":
        log.info("MoE experts implementation: %s%s", moe,
                 f" (capacity_factor {cfg.capacity_factor}, {cfg.capacity_rounding})"
                 if moe == "dropped" else "")
    # Parameters only: buffers (rotary inv_freq) stay float32, as from_pretrained leaves them.
    reference = None
    if lora.is_enabled(cfg):  # one model: the reference is the policy without its adapters
        if with_reference and lora.rewrites_base(cfg):  # ... unless the init rewrites the base
            reference = cast_parameters(copy.deepcopy(model), DTYPES[cfg.reference_dtype])
            reference.eval().requires_grad_(False)
        torch.manual_seed(seed)  # the adapters' initialisation, the same on every process
        policy = lora.apply_lora(model, cfg, seed).train()
        if with_reference and reference is None:
            reference = lora.AdaptersOff(policy).eval()
    else:
        if with_reference:
            reference = cast_parameters(copy.deepcopy(model), DTYPES[cfg.reference_dtype])
            reference.eval().requires_grad_(False)
        # A mixed-precision policy keeps float32 masters (models/precision.py).
        policy = cast_parameters(model, storage_dtype(cfg)).train()
    if cfg.freeze_router and not freeze_routers(policy):
        raise ModelLoadError(f"model.freeze_router=true: {type(policy).__name__} has no "
                             "router (a dense model); set model.freeze_router=false")
    if cfg.router_bias_update_rate > 0 and not correction_bias_routers(policy):
        raise ModelLoadError(f"model.router_bias_update_rate={cfg.router_bias_update_rate}: "
                             f"{type(policy).__name__} has no router with a correction bias "
                             "(DeepSeek-V3 and GLM-4-MoE have one); set it to 0")
    if cfg.logps_chunk_size > 0:  # after the copy: each model's head wraps its own weights
        for each in (policy, reference):
            if each is not None and not isinstance(each, lora.AdaptersOff):
                chunked_head.enable(each, cfg.logps_chunk_size)
    return policy, reference


def materialize(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A meta-device model (sharded or not) -> uninitialised storage on `device`, with its
    non-persistent buffers (rotary `inv_freq`) computed again: no checkpoint holds them, so
    the module that owns them is built once more on the CPU to take its values."""
    model.to_empty(device=device)
    for name, module in model.named_modules():
        buffers = non_persistent_buffers(module)
        if not buffers:
            continue
        try:
            with torch.device("cpu"):
                fresh = type(module)(module.config)
        except (AttributeError, TypeError) as err:
            raise ModelLoadError(
                f"model.meta_init=true: cannot rebuild the buffers of {name} "
                f"({type(module).__name__}: {err}); set model.meta_init=false") from None
        for buffer in buffers:
            getattr(module, buffer).copy_(getattr(fresh, buffer))
    return model


def check_vocab(tokenizer, model: torch.nn.Module, source: str | Path | None = None) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ModelLoadError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}; "
            "use the model's own tokenizer (model.tokenizer_name_or_path)")
    if len(tokenizer) * 4 < vocab:
        log.warning("the tokenizer (%s) has %d tokens, the model %d: with model.config_path the "
                    "embedded demo tokenizer is used unless model.tokenizer_name_or_path is set",
                    source or "embedded", len(tokenizer), vocab)
