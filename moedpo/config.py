"""Typed configuration schema and up-front validation.

The schema is registered with Hydra's ConfigStore as the base of `conf/config.yaml`, so Hydra
type-checks every override (``lr=abc`` fails) and rejects unknown keys. `validate` then checks
what types cannot: names, ranges and combinations, each failure a one-line `ConfigError`
naming the key.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

CONF_DIR = Path(__file__).resolve().parent / "conf"
MODEL_JSON_DIR = CONF_DIR / "models"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

DATASET_NAMES = ("hh", "shp", "os", "demo", "demo_chat")
SCHEDULES = ("WarmupHoldPolicy", "CosineAnnealing")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRUNCATION_MODES = ("keep_end", "keep_start")
MOE_IMPLEMENTATIONS = ("auto", "hf", "hf_eager", "dropless", "dense", "dropped")
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
# The original's XLA-only optimizer; off XLA it is plain torch AdamW.
OPTIMIZER_ALIASES = {"ADAMW_TORCH_XLA": "AdamW"}


# The config tree's groups (moedpo/conf/<group>/): chosen by name, not set key by key.
GROUPS = ("model", "sched", "experiment")


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line naming the key."""


@dataclass
class FSDPConfig:
    # null: the model's own `_no_split_modules` (MixtralDecoderLayer for Mixtral).
    transformer_layer_cls_to_wrap: list[str] | None = None
    xla_fsdp_v2: bool = True
    xla_fsdp_grad_ckpt: bool = True


@dataclass
class LoraConfig:
    # Low-rank adapters through PEFT (README "LoRA"); r = 0: off (full fine-tuning).
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input (not on the experts: PEFT cannot there)
    # PEFT target_modules; null: every linear projection of attention and dense MLPs
    # (not the head, the routers, or the experts).
    target_modules: list[str] | None = None
    # Adapters on the fused expert weights too (PEFT target_parameters: one pair per expert).
    target_experts: bool = True
    use_rslora: bool = False
    # PEFT's init_lora_weights: true (B = 0: the policy starts as the base), gaussian,
    # pissa, olora, ...
    init: Any = True
    quantize: str | None = None  # 4bit: QLoRA's NF4 base (bitsandbytes, CUDA only)


@dataclass
class ModelConfig:
    name_or_path: str = "mistralai/Mixtral-8x7B-v0.1"
    config_path: str | None = None
    tokenizer_name_or_path: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    policy_dtype: str = "bfloat16"
    reference_dtype: str = "bfloat16"
    # With a bfloat16/float16 policy_dtype: float32 master weights, gradients and optimizer
    # state, forward and backward in policy_dtype (README "Precision"). false: pure
    # low-precision parameters and optimizer state (half the memory; DPO-sized updates
    # round away).
    mixed_precision: bool = True
    # The attention kernel (README "Attention"): auto = sdpa where the model class has it,
    # else eager; or sdpa, eager, flash_attention_2, flex_attention as transformers names them.
    attn_implementation: str = "auto"
    # The seed's switch, kept as an alias: false = eager attention (with attn_implementation
    # auto).
    flash_attention: bool = True
    # Let transformers swap layers for kernels from the Hugging Face Hub (its `kernels`
    # package; on by default in from_pretrained since transformers 5.25). Off: moedpo's own
    # experts, attention and precision code run as built. Refused on XLA. README "Attention".
    hub_kernels: bool = False
    capacity_factor: float = 0.0
    # auto: dropped when capacity_factor > 0, else dropless. README "MoE implementations".
    moe_implementation: str = "auto"
    capacity_rounding: str = "floor"
    # Padding tokens claim no expert capacity (the dropped path) and count in no router loss.
    moe_ignore_padding: bool = True
    router_aux_loss_coef: float = 0.0
    # Over what the load-balancing loss's expert shares are taken: micro_batch (each rank's),
    # global_batch (the micro-batch pooled over ranks), sequence (within each sequence).
    router_aux_loss_scope: str = "micro_batch"
    # Router (gate) weights and biases frozen: no gradient, no optimizer state. null: frozen
    # under LoRA, trained otherwise.
    freeze_router: bool | None = None
    # Aux-loss-free balancing (DeepSeek-V3): after each step move each expert's router
    # correction bias by this much toward balance (the sign of its load error); 0: off.
    # Models whose routers have one (DeepSeek-V3, GLM-4-MoE). README "MoE experts".
    router_bias_update_rate: float = 0.0
    router_z_loss_coef: float = 0.0
    # Tokens per chunk for log-probs from the last hidden state (no full logits); 0: off.
    logps_chunk_size: int = 1024
    # Build on the meta device and fill only each process's shards (README "Loading at
    # scale"); null: on under FSDP2 and, with checkpoint_manager_path, under SPMD.
    meta_init: bool | None = None
    # Recompute each decoder layer's forward in the backward: a layer's activations are kept
    # only at its input, for about a third more compute. null: as
    # fsdp_config.xla_fsdp_grad_ckpt when sharded (FSDP2, XLA), off on one process.
    activation_checkpointing: bool | None = None
    # With activation checkpointing: every n-th decoder layer only (1: all), trading back
    # speed for memory.
    activation_checkpointing_every: int = 1
    # torch.compile each decoder layer (CPU and CUDA; XLA compiles the whole step anyway).
    compile: bool = False
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SchedConfig:
    name: str = "WarmupHoldPolicy"
    warmup_steps: int = 150
    min_lr: float = 9e-7


@dataclass
class LossConfig:
    # One name of moedpo.losses.LOSSES, or a list of them summed with `weights` (README
    # "Losses"): e.g. [sigmoid, sft] with [1.0, 0.2] is Llama 3's DPO + NLL.
    name: Any = "sigmoid"
    weights: list[float] | None = None  # null: 1 for each name
    # cDPO / rDPO / EXO / AOT / SimPO label noise e (exo_pair needs e > 0).
    label_smoothing: float = 0.0
    # The DPO family with the reference log-ratios taken as 0 (no reference model).
    reference_free: bool = False
    simpo_gamma: float = 0.5  # SimPO / AlphaPO target margin
    cpo_alpha: float = 1.0  # CPO's NLL weight
    alphapo_alpha: float = 0.25  # AlphaPO's reward shape (-> 0: SimPO)
    dpop_lambda: float = 50.0  # DPO-Positive's penalty weight
    rdpo_alpha: float = 0.01  # R-DPO's length penalty per token
    discopop_tau: float = 0.05  # DiscoPOP's temperature
    # f-DPO: reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence (with f_alpha).
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    # LD-DPO: a response's tokens past the pair's shorter length count ld_alpha in its
    # log-prob (policy and reference); null: off (1).
    ld_alpha: float | None = None
    # WPO: each pair's loss weighted by how likely the policy is to produce its responses.
    use_weighting: bool = False
    # KTO / apo_zero_unpaired: weights of desirable and undesirable rows (TRL's names).
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0


@dataclass
class DataConfig:
    # null: true on XLA (pad to max_length, one compiled graph), false elsewhere.
    static_shapes: bool | None = None
    # With static shapes: pad each batch to the shortest of these lengths that fits it
    # (max_length always included), one compiled graph per length. null: max_length only.
    length_buckets: list[int] | None = None
    strict: bool = False
    # Steps of similar-length pairs (less padding); see data/loader.py.
    group_by_length: bool = False
    # One row per pair: the prompt once, both responses after it (README "Shared prompt").
    # auto: on wherever it is exact (dynamic padding, dropless/dense MoE or dense model, an
    # attention that takes a 4-D mask), else off with one info line; true: on or refuse.
    share_prompt: str = "auto"
    # Several pairs per row (shared-prompt blocks, kept apart by the mask), up to
    # max_tokens_per_row tokens: no padding. auto: on wherever attention runs per pair
    # (models/block_attention.py), else off with one info line; true: on or refuse.
    packing: str = "auto"
    # null: the whole micro-batch in one row where attention runs per pair, else
    # 2 x max_length (a dense mask's cost grows with the square of the row).
    max_tokens_per_row: int | None = None
    # Cut each rank's pairs of a step into forwards of at most this many tokens (as laid
    # out) instead of per_device_train_batch_size pairs each; the step's pairs and its
    # mean-over-pairs loss stay the same (data/micro_batches.py). null: by count.
    tokens_per_batch: int | None = None
    # The tokenizer's BOS at the start of each prompt. auto: where the tokenizer adds it by
    # default (Llama, Mistral, Mixtral), as TRL and the model's pretraining do.
    add_bos: str = "auto"
    # Leave out pairs whose chosen and rejected responses are the same tokens (after
    # truncation): they add nothing but noise to the loss. Counted at start-up either way.
    skip_identical: bool = False
    # A Jinja chat template file for conversational rows; null: the tokenizer's own.
    chat_template: str | None = None
    # The source's own split names, e.g. {train: train_prefs, test: test_prefs}.
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    # Keep each split's tokenised pairs on disk, keyed by the data's version, the tokenizer
    # and the settings: a second run starts in seconds (data/cache.py).
    cache: bool = True
    cache_dir: str | None = None  # null: ~/.cache/moedpo/tokenized (or $MOEDPO_CACHE/tokenized)
    # Read and tokenise the training rows as steps need them (data/stream.py), through a
    # shuffle buffer of this many rows; needs max_steps.
    streaming: bool = False
    shuffle_buffer: int = 10000
    # Sampling weights of the `datasets` (same length): each epoch draws round(w x total
    # pairs) from each source. null: every pair once per epoch (concatenation).
    weights: list[float] | None = None
    # Key renames, ours <- the source's: {prompt: question, chosen: good, rejected: bad}.
    # (Untyped so that `data.columns={...}` may add keys.)
    columns: Any = None


@dataclass
class ReferenceConfig:
    # Run the reference once over the data, cache its log-probs, train without it.
    precompute: bool = False
    cache_dir: str | None = None  # null: output_dir/reference_cache
    # FSDP2 only: keep the reference's shards in host memory between uses.
    cpu_offload: bool = False
    # TR-DPO: every sync_every steps (0: never) the reference moves toward the policy,
    # ref <- sync_alpha x policy + (1 - sync_alpha) x ref (1: a copy). TRL's 512 and 0.6
    # are its defaults when on.
    sync_every: int = 0
    sync_alpha: float = 0.6


@dataclass
class ParallelConfig:
    # auto: xla when torch_xla and PJRT_DEVICE are present, cuda when a GPU is, else cpu.
    backend: str = "auto"
    # Expert parallelism under torchrun: each rank holds 1/N of every layer's experts and the
    # routed tokens move to them (all-to-all); 1 = off (README "Expert parallelism").
    expert_parallel: int = 1


@dataclass
class CheckpointConfig:
    dir: str | None = None  # null: run_dir/checkpoints; local path or fsspec URL (gs://...)
    save_frequency: int = 0  # steps between checkpoints; 0: only at the end and on preemption
    max_to_keep: int | None = 3  # newest complete checkpoints kept; null keeps all
    # Folders (or URL prefixes) whose checkpoints may be read unsigned; see moedpo/trust.py.
    trusted_paths: list[str] = field(default_factory=list)


@dataclass
class DPOConfig:
    exp_name: str = "moe_trial"
    seed: int = 0
    output_dir: str = "/tmp"
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 0.0
    max_steps: int | None = 10
    n_epochs: int | None = None
    use_synthetic_data: bool = True
    label_pad_token_id: int = -100
    pad_token_id: int | None = None
    datasets: Any = "hh"
    dataset_dir: dict[str, str | None] = field(
        default_factory=lambda: {"hh": None, "shp": None, "os": None}
    )
    beta: float = 0.1
    lr: float = 5e-7
    optimizer: str = "ADAMW_TORCH_XLA"
    weight_decay: float = 0.0
    max_length: int = 512
    max_prompt_length: int = 256
    truncation_mode: str = "keep_end"
    do_first_eval: bool = False
    eval_frequency: int = 3
    num_proc: int = 1
    aux_nll_loss_coef: float = 0.0
    checkpoint_manager_path: str | None = None
    dry_run: bool = False
    shuffle: bool = True
    full_precision: bool = False
    local_compile_cache_dir: str | None = None
    tensor_parallelism: int = 1
    report_metrics_freq: int = 1
    sample_during_eval: bool = False
    n_eval_model_samples: int = 4
    sample_max_new_tokens: int = 64
    sample_reference: bool = False
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume: Any = "auto"  # auto | false | PATH of a checkpoint
    overwrite: bool = False
    max_consecutive_nonfinite: int = 5
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    @property
    def run_url(self) -> str | None:
        """output_dir/exp_name when output_dir is a URL (gs://...), else None."""
        if not is_url(self.output_dir):
            return None
        return f"{self.output_dir.rstrip('/')}/{self.exp_name}"

    @property
    def run_dir(self) -> Path:
        """Where the run's files are written: output_dir/exp_name, or for a URL output_dir its
        local mirror, uploaded to `run_url` as the run goes (run_dir.publish)."""
        return local_run_dir(self.output_dir, self.exp_name)

    @property
    def checkpoint_dir(self) -> str:
        if self.checkpoint.dir:
            return self.checkpoint.dir
        return f"{self.run_url}/checkpoints" if self.run_url else str(self.run_dir / "checkpoints")

    @property
    def resume_mode(self) -> str | None:
        """"auto", None (start fresh) or a checkpoint path."""
        value = self.resume
        if value is None or value is False or str(value).lower() in ("false", "no", "off"):
            return None
        return "auto" if value is True or str(value).lower() in ("auto", "true") else str(value)

    @property
    def dataset_list(self) -> list[str]:
        return [self.datasets] if isinstance(self.datasets, str) else list(self.datasets)

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_train_batch_size


def is_url(path: str) -> bool:
    """A remote fsspec URL (gs://, s3://, memory://...); file:// is a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_run_dir(output_dir: str, exp_name: str) -> Path:
    """output_dir/exp_name on this machine. For a URL, a mirror under ~/.cache/moedpo/runs
    named by the URL: `Path("gs://b/runs")` would eat a slash and write every file to a local
    folder `gs:/b/runs`, lost with the VM."""
    import hashlib

    if not is_url(output_dir):
        return Path(str(output_dir).removeprefix("file://")).expanduser() / exp_name
    url = f"{output_dir.rstrip('/')}/{exp_name}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "moedpo" / "runs" / hashlib.sha256(url.encode()).hexdigest()[:16] / exp_name


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="moedpo_schema", node=DPOConfig)
    # Hydra's own run folder (.hydra/) follows the same rule: local, or the URL's mirror.
    OmegaConf.register_new_resolver(
        "moedpo_run_dir", lambda out, name: str(local_run_dir(out, name)), replace=True)


def schema_keys(node: type = DPOConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``model.fsdp_config.xla_fsdp_v2``."""
    keys = []
    for f in fields(node):
        key = prefix + f.name
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            keys += schema_keys(type(default), key + ".")
        elif isinstance(default, dict):
            keys += [f"{key}.{k}" for k in default]
    return keys


def suggest_key(key: str) -> str:
    close = difflib.get_close_matches(key, schema_keys(), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve_model_json(path: str) -> Path:
    """`model.config_path` as given, else a bare file name shipped in moedpo/conf/models/."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    shipped = MODEL_JSON_DIR / given.name
    if given.name == path and shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.name for p in MODEL_JSON_DIR.glob("*.json")))
    raise ConfigError(
        f"model.config_path={path}: no such file, and no shipped model JSON of that name "
        f"(shipped: {available})"
    )


def resolve_optimizer(name: str) -> type[torch.optim.Optimizer]:
    cls = getattr(torch.optim, OPTIMIZER_ALIASES.get(name, name), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        known = sorted(
            n
            for n in dir(torch.optim)
            if isinstance(getattr(torch.optim, n), type)
            and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
            and n != "Optimizer"
        )
        raise ConfigError(
            f"optimizer={name}: not a torch.optim optimizer; use one of "
            f"{', '.join(known + list(OPTIMIZER_ALIASES))}"
        )
    return cls
