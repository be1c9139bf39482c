"""LoRA DPO through PEFT: one copy of the weights; the reference is the base.

`model.lora.r > 0` wraps the policy in PEFT's `PeftModel` (the adapters users already load
with `PeftModel.from_pretrained`): LoRA pairs on the attention and dense MLP projections
(`target_modules`) and, with `target_experts`, on the fused expert weights of transformers'
experts modules through PEFT's `target_parameters` (one low-rank pair per expert; PEFT
parametrizes the stacked weight during the experts' forward, so every moedpo experts
implementation reads W + scale * B A as it reads W). Everything else is frozen, the routers
included unless `model.freeze_router=false`.

The reference is the same model with its adapters switched off (`AdaptersOff`): no second
copy of the weights, no reference memory. The frozen base is stored in `policy_dtype`
(bfloat16 needs no float32 master: it never changes); under mixed precision only the
adapters keep float32 masters.
"""

from __future__ import annotations

import logging
import math
import zlib

import torch
from torch import nn

from ..config import DTYPES, ConfigError, ModelConfig
from .expert_layout import is_experts
from .precision import cast_parameters, storage_dtype
from .router import router_modules

log = logging.getLogger(__name__)


def is_enabled(cfg: ModelConfig) -> bool:
    return cfg.lora.r > 0


def default_target_modules(model: nn.Module) -> list[str]:
    """Names (last components) of the model's linear projections outside the head, the
    routers and the experts: attention and dense MLPs, shared experts included."""
    excluded = {id(m) for m in router_modules(model)}
    excluded.add(id(model.get_output_embeddings()))
    for module in model.modules():
        if is_experts(module):
            excluded.update(id(m) for m in module.modules())
    targets, others = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            keep = id(module) not in excluded and module.out_features > 1  # not a scalar gate
            (targets if keep else others).add(name.rsplit(".", 1)[-1])
    # PEFT matches by suffix: a name an excluded module shares would adapt it too.
    return sorted(targets - others)


def expert_parameters(model: nn.Module) -> list[str]:
    """PEFT target_parameters for the fused expert weights: `experts.gate_up_proj`, ..."""
    names = set()
    for name, module in model.named_modules():
        if is_experts(module):
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() == 3:  # the stacked [E, ., .] weights, not the [E, .] biases
                    names.add(f"{name.rsplit('.', 1)[-1]}.{param_name}")
    return sorted(names)


def check_targets(targets: list[str], model: nn.Module) -> None:
    """Each of model.lora.target_modules names a module of `model` as PEFT matches them (the
    full name or its last components); else a one-line error listing the linear layers."""
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                             if isinstance(m, nn.Linear)})
            raise ConfigError(f"model.lora.target_modules: '{target}' names no module of "
                              f"{type(model).__name__}; its linear layers are "
                              f"{', '.join(linear)}")


def peft_config(cfg: ModelConfig, model: nn.Module):
    """The `peft.LoraConfig` of `model.lora` for this model."""
    from peft import LoraConfig

    lora = cfg.lora
    modules = list(lora.target_modules) if lora.target_modules is not None else \
        default_target_modules(model)
    check_targets(modules, model)
    experts = expert_parameters(model) if lora.target_experts else []
    if lora.dropout and experts:
        raise ConfigError(f"model.lora.dropout={lora.dropout} with target_experts: PEFT's "
                          "expert adapters take no dropout; set model.lora.dropout=0 or "
                          "model.lora.target_experts=false")
    if not modules and not experts:
        raise ConfigError("model.lora: nothing to adapt (no target_modules and no experts); "
                          "set model.lora.target_modules")
    saved = []
    if cfg.freeze_router is False:  # a trained router: PEFT keeps a trainable copy of it
        routers = {id(r) for r in router_modules(model)}
        saved = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                        if id(m) in routers})
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=modules or None, target_parameters=experts or None,
                      use_rslora=lora.use_rslora, init_lora_weights=lora.init,
                      modules_to_save=saved or None, task_type="CAUSAL_LM")


# Linear layers QLoRA keeps unquantized: the head and the routers (small, and the routing
# decisions are sensitive to their rounding).
NOT_QUANTIZED = ["lm_head", "embed_out", "gate", "router", "shared_expert_gate"]


def is_quantized(cfg: ModelConfig) -> bool:
    return is_enabled(cfg) and cfg.lora.quantize == "4bit"


def quantization(cfg: ModelConfig):
    """QLoRA's base (`model.lora.quantize=4bit`): transformers' bitsandbytes config for
    `from_pretrained`, which quantizes every nn.Linear but the head and routers to NF4 with
    double quantization as it loads, computing in `policy_dtype`. The fused expert stacks
    are no nn.Linear: bitsandbytes leaves them in `policy_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[cfg.policy_dtype],
                              llm_int8_skip_modules=NOT_QUANTIZED)


def apply_lora(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """`model` (the base, any dtype; 4-bit under QLoRA) -> a PeftModel: the base frozen in
    `policy_dtype`, the adapters in the policy's storage dtype (float32 under mixed
    precision)."""
    from peft import get_peft_model

    check_init(cfg)
    config = peft_config(cfg, model)
    cast_parameters(model, DTYPES[cfg.policy_dtype])
    policy = get_peft_model(model, config, autocast_adapter_dtype=False)
    dtype = storage_dtype(cfg)
    for param in policy.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    if not is_meta(policy):
        init_adapters(policy, cfg, seed)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    log.info("%s r=%d alpha=%g on %s%s: %.3fM trainable parameters (%.2f%% of %.2fM)",
             "QLoRA (NF4 base)" if is_quantized(cfg) else "LoRA", cfg.lora.r, cfg.lora.alpha,
             ", ".join(sorted(config.target_modules or ())) or "-",
             f" and experts ({', '.join(sorted(config.target_parameters))})"
             if config.target_parameters else "", trainable / 1e6, 100 * trainable / total,
             total / 1e6)
    return policy


def base_key(name: str) -> str | None:
    """The plain model's state-dict key of a PeftModel's key (`base_model.model.` and every
    `.base_layer` dropped; a router's trainable copy and its original both read the router's
    weights), or None for the adapters' own parameters, which no base checkpoint holds."""
    if "lora_" in name:
        return None
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace(".modules_to_save.default", "").replace(".original_module", "")


# PEFT's inits that need nothing but a shape (the others read the base weights). NoRA (PEFT
# 0.22): A random with unit-norm columns, B = 0.
SHAPE_ONLY_INITS = (True, "gaussian", "nora")

# PEFT's init_lora_weights values (model.lora.init) by what each does to the starting policy.
# PiSSA and OLoRA replace each adapted base weight W by the residual W - BA: the policy starts
# as W, but the base with adapters off is the residual, so their reference is a frozen copy
# of the original base (one more copy of the weights, as in full fine-tuning).
REWRITES_BASE = ("pissa", "olora")  # pissa_niter_<n> too
# Inits a DPO run cannot start from here, and why.
REFUSED_INITS = {
    False: "starts the adapters random (PEFT offers it for debugging), so the policy would not "
           "start as the reference",
    "eva": "needs a data pass over the training set (peft.initialize_lora_eva_weights) that "
           "moedpo does not run",
    "corda": "needs a calibration pass (peft's preprocess_corda) that moedpo does not run",
    "astra": "needs a calibration pass (peft's preprocess_astra) that moedpo does not run",
    "loftq": "quantizes the base with its own loftq_config; for a quantized base use "
             "model.lora.quantize=4bit with init=true",
}
# Inits PEFT applies to nn.Linear weights only, not to fused experts (target_parameters). NoRA
# is documented for target_parameters too, but PEFT 0.22 reads `.weight` of the experts
# module, which fused experts do not have (tests/models/test_lora_inits.py tries it).
LINEAR_ONLY_INITS = ("pissa", "olora", "orthogonal", "mica", "nora")
INITS = (True, "gaussian", "nora", "pissa", "pissa_niter_<n>", "olora", "orthogonal", "mica")


def peft_inits() -> set:
    """The init_lora_weights values the installed PEFT declares (its LoraConfig's public type
    hint), as `init_family` names them: a newer PEFT offers more than an older one."""
    import typing

    import peft

    hint = typing.get_type_hints(peft.LoraConfig)["init_lora_weights"]
    values = set()
    for arg in typing.get_args(hint):
        values.update(typing.get_args(arg) or ((True, False) if arg is bool else ()))
    return {init_family(v.replace("[number of iters]", "4")) if isinstance(v, str) else v
            for v in values}


def init_family(init) -> object:
    """`pissa_niter_4` -> `pissa` (PEFT's fast-SVD PiSSA); any other value as it is."""
    if isinstance(init, str) and init.startswith("pissa_niter_") \
            and init.removeprefix("pissa_niter_").isdigit():
        return "pissa"
    return init


def check_init(cfg: ModelConfig) -> None:
    """model.lora.init: a value PEFT offers that gives a starting policy equal to the
    reference (the base with adapters off, or its copy), on what the run adapts."""
    init = cfg.lora.init
    family = init_family(init)
    shown = str(init).lower() if isinstance(init, bool) else init
    if family in REFUSED_INITS:
        raise ConfigError(f"model.lora.init={shown}: {REFUSED_INITS[family]}; use one of "
                          f"{', '.join(str(i).lower() for i in INITS)}")
    if family not in INITS:
        raise ConfigError(f"model.lora.init={shown}: not an init PEFT offers; use one of "
                          f"{', '.join(str(i).lower() for i in INITS)}")
    if family not in peft_inits():
        import peft

        raise ConfigError(f"model.lora.init={shown}: the installed peft {peft.__version__} "
                          "does not offer it yet; upgrade peft (pip install -U peft) or use "
                          "model.lora.init=true")
    if family == "orthogonal" and cfg.lora.r % 2:
        raise ConfigError(f"model.lora.init=orthogonal with model.lora.r={cfg.lora.r}: PEFT's "
                          "orthogonal init pairs rows of A and B, so r must be even")
    if family in LINEAR_ONLY_INITS and cfg.lora.target_experts:
        raise ConfigError(f"model.lora.init={shown}: PEFT applies it to linear layers only, not "
                          "to fused experts; set model.lora.target_experts=false (or init=true)")


def rewrites_base(cfg: ModelConfig) -> bool:
    return is_enabled(cfg) and init_family(cfg.lora.init) in REWRITES_BASE


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def init_adapters(policy: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """The adapters' starting values, as PEFT draws them (`init=true`: A kaiming-uniform
    with a = sqrt(5), B = 0; `gaussian`: A ~ N(0, 1/r), B = 0), each from a generator seeded
    by `seed` and the parameter's name. PEFT draws them from the global generator in
    creation order, which a model built on the meta device cannot replay; drawn by name they
    are the same whether the model was built whole, on the meta device and filled from a
    checkpoint, or sharded over ranks (each rank draws the whole small matrix, keeps its
    shard). Other inits (pissa, olora, ...) are PEFT's own, from the loaded base."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if cfg.lora.init not in SHAPE_ONLY_INITS:
        return
    for name, param in policy.named_parameters():
        if "lora_A" not in name and "lora_B" not in name:
            continue
        full = torch.zeros(param.shape, dtype=torch.float32)
        if "lora_A" in name:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if cfg.lora.init == "gaussian":
                full.normal_(0.0, 1 / cfg.lora.r, generator=gen)
            else:
                nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
        full = full.to(param.dtype)
        if isinstance(param, DTensor):  # every rank drew the same; each keeps its shard
            full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                     src_data_rank=None)
        param.copy_(full)


class AdaptersOff(nn.Module):
    """The reference of a LoRA run: the policy's own modules with its adapters switched off
    (PEFT's `disable_adapter`), so it computes the base model. It holds the policy as a
    submodule (its routers are found for the drift metrics) but never changes its mode:
    `eval()` on the reference must not turn the training policy's dropout and
    checkpointing off."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def train(self, mode: bool = True) -> AdaptersOff:
        self.training = mode
        return self

    @property
    def config(self):
        return self.policy.config

    def get_input_embeddings(self) -> nn.Module:
        return self.policy.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def forward(self, *args, **kwargs):
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        with self.policy.disable_adapter():
            # PEFT freezes the adapters while they are off, and FSDP2 fixes each group's
            # gradient dtype from the parameters trainable at its first forward, which may
            # be this one: frozen then, a bf16 run's adapters got bf16 gradients for their
            # float32 masters and the backward failed. Off adapters are in no graph, so they
            # stay trainable here.
            for param in trainable:
                param.requires_grad_(True)
            return self.policy(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy.generate(*args, **kwargs)
