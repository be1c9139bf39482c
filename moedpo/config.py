"""The typed configuration schema: every key with its type, default, meaning and the values it
accepts, in one place.

The schema is registered with Hydra's ConfigStore as the base of `conf/config.yaml`, so Hydra
type-checks every override (``lr=abc`` fails) and rejects unknown keys. Each key is declared
with `setting`: its documentation (the config reference, docs/reference/config.md, is generated
from it) and its names or range, which `check_settings` enforces in one pass. What one key
cannot say (combinations, files, the backend) is in validate.py.
"""

from __future__ import annotations

import copy
import difflib
import math
import operator
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
LOGGERS = ("tensorboard", "wandb", "mlflow")
TRI_STATE = ("auto", "true", "false")  # decided per run (auto), or forced either way
# f-DPO's divergences (moedpo/losses/divergence.py scores each).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


# The config tree's groups (moedpo/conf/<group>/): chosen by name, not set key by key.
GROUPS = ("model", "sched", "experiment")


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message is one line naming the key."""


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, group: str | None = None) -> Any:
    """One key of the schema: its default, what it means (markdown, rendered into the config
    reference), the names it takes or the range it lies in (null always passes where the type
    allows it), and for a top-level key the reference's section. Names are a tuple rather than
    a `Literal` type because OmegaConf's structured configs reject Literal annotations."""
    metadata = {"help": help, "choices": choices, "group": group,
                "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                           if v is not None}}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, group: str) -> Any:
    """A nested group of keys (`model.*`, `loss.*`, ...) in the reference's section `group`."""
    return field(default_factory=cls, metadata={"group": group})


@dataclass
class FSDPConfig:
    transformer_layer_cls_to_wrap: list[str] | None = setting(None,
        "layers to shard and checkpoint; `null` = the model's own decoder layer "
        "(`MixtralDecoderLayer`, `GPTNeoXLayer`)")
    xla_fsdp_v2: bool = setting(True,
        "FSDP through SPMD on XLA, the only sharding moedpo runs there (`false`, torch_xla's "
        "FSDP v1 wrapper, is refused)")
    xla_fsdp_grad_ckpt: bool = setting(True,
        "activation checkpointing per wrapped layer when sharded (FSDP2, XLA); "
        "`model.activation_checkpointing` overrides it")


@dataclass
class LoraConfig:
    r: int = setting(0,
        "LoRA rank; `> 0` trains PEFT adapters instead of the full model, the reference being "
        "the base (adapters off): see [LoRA](../models.md#lora)",
        ge=0)
    alpha: float = setting(16.0,
        "LoRA scale numerator: updates are `alpha / r x B A` (`alpha / sqrt(r)` with "
        "`use_rslora`)",
        gt=0)
    dropout: float = setting(0.0,
        "dropout on the adapters' input; refused with `target_experts` (PEFT's expert adapters "
        "take none)",
        ge=0, lt=1)
    target_modules: list[str] | None = setting(None,
        "PEFT `target_modules`; `null` = every linear projection of attention and dense MLPs "
        "(shared experts included), not the head, routers or experts")
    target_experts: bool = setting(True,
        "adapters on the fused expert weights too (`gate_up_proj`/`up_proj`, `down_proj`; PEFT "
        "`target_parameters`, one low-rank pair per expert)")
    use_rslora: bool = setting(False,
        "rank-stabilised scale `alpha / sqrt(r)`")
    # Untyped: true/false or the name of an init (gaussian, pissa, ...).
    init: Any = setting(True,
        "PEFT `init_lora_weights`: `true` (B = 0, the policy starts as the base), `gaussian`, "
        "`pissa`, `olora`, ...")
    quantize: str | None = setting(None,
        "`4bit`: QLoRA, the base loaded as bitsandbytes NF4 (double quantization, compute in "
        "`policy_dtype`; head, routers and fused experts kept unquantized); needs "
        "`model.name_or_path` and `pip install 'moedpo[qlora]'`; one process (CUDA or CPU), not "
        "torchrun or XLA. See [LoRA](../models.md#lora)",
        choices=("4bit",))


@dataclass
class ModelConfig:
    name_or_path: str = setting("mistralai/Mixtral-8x7B-v0.1",
        "pretrained model: hub id (downloaded or from the hub cache; offline with "
        "`HF_HUB_OFFLINE=1`) or local folder")
    config_path: str | None = setting(None,
        "build the model from a JSON config with random init instead; a path, or the bare name "
        "of a shipped one: `mixtral80.json`, `mixtral822.json`, `mixtral822-instruct.json`, "
        "`tiny-mixtral.json`, `tiny-gpt-oss.json` (gpt-oss's layout at demo size), "
        "`qwen3-30b-a3b.json`, `gpt-oss-120b.json`, `deepseek-v3.json`")
    config_overrides: dict[str, Any] = setting({},
        "fields of the model's config set before it is built, e.g. "
        "`+model.config_overrides.num_hidden_layers=2` (a shallower copy for a quick test; "
        "`moedpo plan` traces shallow copies this way): any attribute the config class has")
    tokenizer_name_or_path: str | None = setting(None,
        "tokenizer; `null` = the model's (`name_or_path`), or the embedded one with "
        "`config_path`")
    revision: str | None = setting(None,
        "hub revision (branch, tag or commit)")
    trust_remote_code: bool = setting(False,
        "allow model code from the hub; off unless you turn it on")
    policy_dtype: str = setting("bfloat16",
        "the policy's compute dtype: `float32`, `bfloat16` or `float16`; low precision is mixed "
        "precision (float32 master weights, see [Precision](../models.md#precision)). On CPU "
        "use `float32`: bf16 matmuls are much slower there",
        choices=tuple(DTYPES))
    reference_dtype: str = setting("bfloat16",
        "the frozen reference's dtype (parameters; buffers such as rotary frequencies stay "
        "float32)",
        choices=tuple(DTYPES))
    mixed_precision: bool = setting(True,
        "with a `bfloat16`/`float16` policy: float32 master weights, gradients and optimizer "
        "state, forward and backward on a low-precision copy; `false` = pure low-precision "
        "parameters and optimizer state (half the memory, but DPO-sized updates round away). "
        "See [Precision](../models.md#precision)")
    attn_implementation: str = setting("auto",
        "the attention kernel: `auto` (`sdpa` where the model class has it, else `eager`: "
        "gpt-oss), `sdpa`, `eager`, `flash_attention_2`, `flex_attention`; see "
        "[Attention](../models.md#attention)",
        choices=ATTENTION_IMPLEMENTATIONS)
    flash_attention: bool = setting(True,
        "the seed's switch, kept as an alias: `false` = eager attention (with "
        "`attn_implementation=auto`)")
    hub_kernels: bool = setting(False,
        "let transformers swap layers for Hugging Face Hub kernels (its `kernels` package) at "
        "each `train()`/`eval()`; off = moedpo's own experts, attention and precision code run "
        "as built. Refused on XLA and with meta init; see [Attention](../models.md#attention)")
    capacity_factor: float = setting(0.0,
        "`> 0` selects the dropped MoE with this capacity factor (typically 1 to 2)",
        ge=0)
    moe_implementation: str = setting("auto",
        "`auto` (`dropped` if `capacity_factor > 0`, else `dropless`; `dense` on XLA), `hf`, "
        "`hf_eager`, `dropless`, `dense`, `dropped`; see [MoE implementations](../models.md)",
        choices=MOE_IMPLEMENTATIONS)
    capacity_rounding: str = setting("floor",
        "capacity per sequence: `floor` = `int(S*k/E*cf)` as the original (may be 0), `ceil` = "
        "rounded up, at least 1 (as MaxText)",
        choices=("floor", "ceil"))
    moe_ignore_padding: bool = setting(True,
        "padding tokens claim no expert capacity and count in no router loss or statistic")
    router_aux_loss_coef: float = setting(0.0,
        "add coef x the load-balancing loss of the policy's routers (the original adds none; "
        "Mixtral pre-training and TRL use 0.02 / 0.001)",
        ge=0)
    router_aux_loss_scope: str = setting("micro_batch",
        "over what the load-balancing loss's expert shares are taken: `micro_batch` (each "
        "rank's micro-batch), `global_batch` (the whole optimizer step: every rank's part of "
        "every accumulated micro-batch; 2 ranks and 2 x 4 accumulation train as 1 x 8), "
        "`sequence` (within each sequence, averaged: DeepSeek-V3's sequence-wise loss); see "
        "[MoE experts](../models.md#moe-experts)",
        choices=("micro_batch", "global_batch", "sequence"))
    freeze_router: bool | None = setting(None,
        "the routers (gates) of an MoE policy take no gradient and get no optimizer state: "
        "routing stays the pretrained model's (as many MoE fine-tuning recipes do); refused on "
        "a dense model. `null` = frozen under LoRA, trained otherwise; `false` under LoRA "
        "trains a copy of each router (PEFT `modules_to_save`)")
    router_bias_update_rate: float = setting(0.0,
        "aux-loss-free balancing (DeepSeek-V3): after each step move each expert's router "
        "correction bias by this much toward balance; models with `e_score_correction_bias` "
        "(DeepSeek-V3, GLM-4-MoE); see [MoE experts](../models.md#moe-experts)",
        ge=0)
    router_z_loss_coef: float = setting(0.0,
        "add coef x the router z-loss (ST-MoE), mean squared logsumexp of the router logits",
        ge=0)
    logps_chunk_size: int = setting(1024,
        "compute response log-probs from the last hidden state, this many tokens at a time "
        "under activation checkpointing, so the `[2 x batch, length, vocab]` float32 logits "
        "never exist whole (forward or backward); `0` = the plain full-logits path. Same values "
        "and gradients (`tests/models/test_chunked_head.py`: 1e-5), the model's own logit "
        "transform included (Granite's `logits_scaling`, Cohere's `logit_scale`, Gemma 2/3's "
        "`final_logit_softcapping`), for the 53 families of `HEAD_LOGITS` in "
        "`moedpo/models/families.py` (each checked in `tests/models/test_families.py`); any "
        "other family, remote code or a subclass with its own forward keeps full logits, with "
        "one info line",
        ge=0)
    meta_init: bool | None = setting(None,
        "build policy and reference on the meta device (no storage), shard them, then fill only "
        "each process's shards; `null` = on under FSDP2 (torchrun), and on XLA when "
        "`checkpoint_manager_path` is set. See [Loading at "
        "scale](../scaling.md#loading-at-scale)")
    activation_checkpointing: bool | None = setting(None,
        "recompute each decoder layer's forward in the backward: only the layer inputs are "
        "kept, for about a third more compute. Works on every backend (transformers' per-layer "
        "checkpointing, non-reentrant, on CPU/CUDA and under FSDP2; torch_xla's on XLA); `null` "
        "= `model.fsdp_config.xla_fsdp_grad_ckpt` when sharded (FSDP2, XLA), off on a single "
        "process. Same loss and gradients (`tests/parallel/test_layers.py`)")
    activation_checkpointing_every: int = setting(1,
        "with checkpointing on, only every n-th decoder layer (1 = all): a middle ground "
        "between memory and speed",
        ge=1)
    compile: bool = setting(False,
        "`torch.compile` each decoder layer of policy and reference (in place: parameter names "
        "and checkpoints unchanged), before FSDP2 wraps them, as torchtitan does per block. "
        "Meant for CUDA, where it fuses the elementwise work around the matmuls; the first "
        "steps compile (a new batch length once more, then shapes are dynamic). The dropless "
        "experts' per-expert matmuls stay eager (their row counts change every batch). On this "
        "CPU it does not pay: tiny model, same step time, +140 MB RSS for the compiler. Refused "
        "on XLA, which compiles the whole step anyway. Same loss and gradients as eager, no "
        "recompilation per batch (`tests/parallel/test_layers.py`)")
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SchedConfig:
    name: str = setting("WarmupHoldPolicy",
        "`WarmupHoldPolicy`: linear warm-up `(step+1)/(warmup_steps+1)`, then constant; "
        "`CosineAnnealing`: the same warm-up, then cosine to `min_lr` at the last step. Select "
        "with `sched=NAME`",
        choices=SCHEDULES)
    warmup_steps: int = setting(150,
        "warm-up steps",
        ge=0)
    min_lr: float = setting(9e-7,
        "final lr of `CosineAnnealing` (capped at `lr`)",
        ge=0)


@dataclass
class LossConfig:
    # Untyped: one name or a list of them.
    name: Any = setting("sigmoid",
        "one loss of the [loss table](../losses/index.md), or a list of them (`[sigmoid,sft]`) "
        "summed with `loss.weights`")
    weights: list[float] | None = setting(None,
        "one weight per name (`null`: 1 each); the step's loss is sum of weight x mean over "
        "pairs")
    label_smoothing: float = setting(0.0,
        "the label-noise rate e in `[0, 0.5)`: conservative DPO with `sigmoid`, the flip rate "
        "of `robust`, the target of `exo_pair` (which needs e > 0), smoothing of `aot`, "
        "`simpo`, `cpo`, `alphapo`",
        ge=0, lt=0.5)
    reference_free: bool = setting(False,
        "the DPO family with the reference log-ratio taken as 0: no reference model is built or "
        "run")
    simpo_gamma: float = setting(0.5,
        "SimPO / AlphaPO target margin gamma (TRL's default)")
    cpo_alpha: float = setting(1.0,
        "weight of CPO's NLL term (TRL's default)",
        ge=0)
    alphapo_alpha: float = setting(0.25,
        "AlphaPO's reward shape alpha (alpha -> 0 is SimPO; 0 is refused: use `simpo`)")
    dpop_lambda: float = setting(50.0,
        "DPO-Positive's penalty weight lambda (the paper's 50)",
        ge=0)
    rdpo_alpha: float = setting(0.01,
        "R-DPO's length penalty per token of length difference")
    discopop_tau: float = setting(0.05,
        "DiscoPOP's temperature (the paper's and TRL's)",
        gt=0)
    f_divergence: str = setting("reverse_kl",
        "f-DPO (arXiv 2309.16240): `reverse_kl` (DPO), `forward_kl`, `js_divergence`, "
        "`alpha_divergence`; only with the losses on the score difference (TRL's rule)",
        choices=F_DIVERGENCES)
    f_alpha: float = setting(0.5,
        "the alpha of `alpha_divergence`")
    ld_alpha: float | None = setting(None,
        "LD-DPO (arXiv 2409.06411): in each response's log-prob (policy and reference), the "
        "tokens past the pair's shorter response count `ld_alpha` times (TRL's `ld_alpha`); in "
        "`[0, 1]`, `null` = off. It reweights the preference term's log-ratios only: NLL terms "
        "(`sft`, CPO's and ORPO's NLL, the `nll_loss` metric) and per-token means (SimPO, ORPO, "
        "AlphaPO) read the unweighted likelihoods, as TRL's NLL does. Works in every row layout "
        "(plain, shared prompt, packed) and with `reference.precompute`",
        ge=0, le=1)
    use_weighting: bool = setting(False,
        "WPO (arXiv 2406.11827, TRL's `use_weighting`): each pair's loss times exp(w_c + w_r), "
        "w = the mean over a response's tokens of log p_t - log sum_v p_v^2 under the policy "
        "(no gradient), so pairs the policy would rarely produce count less; logged as "
        "`wpo_weight`. Costs one more log-sum-exp over the vocabulary per response token (in "
        "the chunked head too). Refused with `aot`/`aot_unpaired`")
    kto_desirable_weight: float = setting(1.0,
        "`kto`, `bco`, `apo_zero_unpaired`: weight lambda_D of desirable rows (TRL's "
        "`desirable_weight`; the KTO paper balances lambda_D n_D against lambda_U n_U within 1 "
        "to 4/3)")
    kto_undesirable_weight: float = setting(1.0,
        "weight lambda_U of undesirable rows")


@dataclass
class DataConfig:
    static_shapes: bool | None = setting(None,
        "pad every batch to exactly `max_length` (`true`) or to its longest pair (`false`); "
        "`null` = true on XLA, false elsewhere")
    length_buckets: list[int] | None = setting(None,
        "with static shapes (XLA): pad each batch to the shortest of these lengths that fits "
        "it, e.g. `[128,256]` (`max_length` is always one), instead of always to `max_length`: "
        "one compiled graph per length, little compute on padding (pair with "
        "`data.group_by_length=true`). With the dropped MoE the capacity follows the padded "
        "length, as with dynamic padding. Tested under SPMD (`make test-xla`): a graph per "
        "bucket compiled when first needed and reused after (3 compilations for 8 steps over "
        "buckets 64/96/128), same run as the CPU trainer")
    strict: bool = setting(False,
        "stop at the first unusable row (naming file and line) instead of skipping and counting "
        "it")
    group_by_length: bool = setting(False,
        "build each step from pairs of similar length, so that dynamic padding pads little: "
        "each epoch's shuffled order is cut into windows of 64 steps, each window sorted by "
        "length and cut into steps, and the steps shuffled. Every pair still comes once per "
        "epoch and resuming sees the same order; steps differ from the ungrouped run's")
    share_prompt: str = setting("auto",
        "run each pair's prompt once: one row `prompt, chosen, rejected` per pair instead of "
        "two rows that both hold the prompt, with a segment attention mask and per-token "
        "position ids so each response sees only the prompt and itself. Same log-probs, "
        "gradients, router losses and expert loads (see [Shared "
        "prompt](../performance.md#shared-prompt)). `auto`: on wherever that holds (dynamic "
        "padding, a dropless or dense MoE or a dense model, sdpa or eager attention, sliding "
        "windows the model can take per layer type), else off with one info line naming why; "
        "`true`: on, or a one-line error where it cannot be; `false`: off",
        choices=TRI_STATE)
    packing: str = setting("auto",
        "several pairs per row: shared-prompt blocks placed first-fit decreasing into rows of "
        "up to `data.max_tokens_per_row` tokens, kept apart by the mask, position ids "
        "restarting per pair, so a batch holds no padding. Same log-probs, gradients and runs "
        "as unpacked (see [Packing](../performance.md#packing)). `auto`: on wherever attention "
        "runs per pair (`sdpa`/`auto` attention, see [Block "
        "attention](../performance.md#block-attention)), where a packed row costs no more "
        "attention than separate ones; off with one info line under a dense mask (eager "
        "attention, a sliding window shorter than `max_length`); `true`: on (needs the "
        "shared-prompt layout: not `data.share_prompt=false`, nor the dropped MoE); under "
        "static shapes (XLA) it bin-packs into rows of exactly `data.max_tokens_per_row` tokens "
        "(see [Packing](../performance.md#packing)); `false`: one pair per row",
        choices=TRI_STATE)
    max_tokens_per_row: int | None = setting(None,
        "the packing budget per row; `null` = the whole micro-batch in one row where attention "
        "runs per pair, else 2 x `max_length` (at least `max_length`; under static shapes every "
        "row is this long, at least 2 x `max_length` so any pair fits)")
    tokens_per_batch: int | None = setting(None,
        "cut each rank's pairs of a step into forwards of at most this many tokens as the rows "
        "lay them out (packed: the sum of the pairs' blocks; padded: rows x the longest) "
        "instead of `per_device_train_batch_size` pairs each; a longer pair gets a forward of "
        "its own, every rank runs as many forwards (no communication: each rank cuts every "
        "rank's share). The step's pairs (`per_device_train_batch_size` x devices x "
        "`gradient_accumulation_steps`) and its loss, the mean over them, are unchanged: each "
        "forward's loss counts by its share of the pairs (see [Token "
        "budgets](../performance.md#token-budgets)). Train rows add `forwards` (per step). Not "
        "with static shapes (XLA) nor `model.router_aux_loss_scope=global_batch`; `null` = by "
        "count",
        gt=0)
    add_bos: str = setting("auto",
        "start each prompt with the tokenizer's BOS: `auto` where the tokenizer adds one by "
        "default (Llama, Mistral, Mixtral; not GPT-NeoX, GPT-2, Qwen), `true`, `false`",
        choices=TRI_STATE)
    skip_identical: bool = setting(False,
        "leave out pairs whose chosen and rejected responses are the same tokens (after "
        "truncation); counted at start-up either way")
    chat_template: str | None = setting(None,
        "a Jinja chat template file (local or URL) for conversational rows, put on the "
        "tokenizer (exports carry it); `null` = the tokenizer's own")
    splits: dict[str, str] = setting({"train": "train", "test": "test"},
        "the split names (`data.splits.train`, `.test`) of folders and Hub ids other than "
        "`hh`/`shp`/`os`, e.g. `train_prefs` / `test_prefs` (UltraFeedback binarized)")
    cache: bool = setting(True,
        "keep each split's tokenised pairs on disk and read them back on the next start with "
        "the same data, tokenizer (and chat template) and settings (see "
        "[Tokenisation](../data.md#tokenisation)); dry runs are not cached")
    cache_dir: str | None = setting(None,
        "where; `null` = `~/.cache/moedpo/tokenized` (`$MOEDPO_CACHE/tokenized`, or under "
        "`$XDG_CACHE_HOME`)")
    streaming: bool = setting(False,
        "read and tokenise the training rows as steps need them instead of all at start-up "
        "(sets too large to hold, Hub sets read without downloading them whole): see "
        "[Streaming](../data.md#streaming). Needs `max_steps`; not with `reference.precompute`, "
        "`data.group_by_length`, `data.weights` or `n_epochs`")
    shuffle_buffer: int = setting(10000,
        "rows in the streaming shuffle buffer (`1`: file order)",
        ge=1)
    weights: list[float] | None = setting(None,
        "sampling weights of `datasets` (one each): an epoch draws round(weight x all pairs) "
        "from each source, up-weighted sources repeating only after all their pairs came, "
        "down-weighted ones sampled without repeats; seeded and exactly resumable. `null` = "
        "every pair once per epoch. With several sources the eval rows also give each source's "
        "metrics (`eval/<source>/rewards/accuracies`, ...)")
    # Untyped so that `data.columns={...}` may add keys.
    columns: Any = setting(None,
        "key renames, ours from the source's, e.g. "
        "`data.columns={prompt:question,chosen:good,rejected:bad}`")

    def __post_init__(self) -> None:
        # YAML's true/false reach a str key as "True"/"False" (OmegaConf) or a bool (Python):
        # the three-way keys hold their lower-case names from here on.
        for name in ("share_prompt", "packing", "add_bos"):
            value = getattr(self, name)
            if isinstance(value, bool) or value in ("True", "False"):
                setattr(self, name, str(value).lower())


@dataclass
class ReferenceConfig:
    precompute: bool = setting(False,
        "run the reference model once over the train and eval pairs before training, cache each "
        "pair's two summed log-probs, and train without the reference model (no reference "
        "forward per step, no reference weights in memory). See [Precomputed "
        "reference](../losses/index.md#precomputed-reference)")
    cache_dir: str | None = setting(None,
        "where precomputed reference log-probs are cached; `null` = "
        "`output_dir/reference_cache`")
    cpu_offload: bool = setting(False,
        "FSDP2 runs: keep the reference's shards in host memory and copy each layer to the GPU "
        "only for its forward (FSDP2's `CPUOffloadPolicy`); saves the reference's share of GPU "
        "memory for some speed")
    sync_every: int = setting(0,
        "TR-DPO (arXiv 2404.09656): every this many steps the reference moves toward the "
        "policy, ref <- alpha x policy + (1 - alpha) x ref, in float32 (0: never; TRL's "
        "`sync_ref_model` / `ref_model_sync_steps`, 512 there). The reference's weights then go "
        "into every checkpoint beside the policy's, so a resumed run continues with the synced "
        "reference. Refused with `reference.precompute` and with losses that read no reference",
        ge=0)
    sync_alpha: float = setting(0.6,
        "TR-DPO's alpha in `(0, 1]` (TRL's `ref_model_mixup_alpha`); 1 copies the policy (the "
        "paper's hard update)",
        gt=0, le=1)


@dataclass
class ParallelConfig:
    backend: str = setting("auto",
        "`cpu`, `cuda` or `xla`; `auto` = `xla` when torch_xla and `PJRT_DEVICE` are present, "
        "`cuda` when a GPU is visible, else `cpu`",
        choices=("auto", "cpu", "cuda", "xla"))
    expert_parallel: int = setting(1,
        "expert parallelism: under torchrun each rank holds 1/N of every layer's experts and "
        "the routed tokens travel to them (all-to-all); on XLA an `expert` mesh axis of size N; "
        "N divides the processes (devices) and the expert count; `1` = off. See [Expert "
        "parallelism](../scaling.md#expert-parallelism)",
        ge=1)
    replicate: int = setting(1,
        "HSDP under torchrun: the processes form R groups of consecutive ranks (one node's "
        "GPUs each); FSDP2 shards every weight within a group and replicates it across the "
        "groups, so the all-gathers and reduce-scatters of every layer stay on a node's links "
        "and only one all-reduce of the gradient shards per step crosses between nodes. R "
        "divides the processes (with `parallel.expert_parallel=E`, R x E does: the experts are "
        "split E ways inside a group too); `1` = every weight sharded over all ranks. See "
        "[HSDP](../scaling.md#hsdp-across-nodes)",
        ge=1)


@dataclass
class CheckpointConfig:
    dir: str | None = setting(None,
        "where training checkpoints go; `null` = `run_dir/checkpoints`; local or fsspec URL")
    save_frequency: int = setting(0,
        "steps between checkpoints; `0` = only at the end and when stopped by a signal",
        ge=0)
    max_to_keep: int | None = setting(3,
        "newest complete checkpoints kept; `null` keeps all",
        ge=1)
    trusted_paths: list[str] = setting([],
        "folders or URL prefixes whose checkpoints training may read without moedpo's signature "
        "(the run's own checkpoint folder always may); see Security under [Checkpoints and "
        "resume](../checkpoints.md)")


@dataclass
class DPOConfig:
    exp_name: str = setting("moe_trial",
        "run name, a plain folder name; outputs go to `output_dir/exp_name`", group="Run and loop")
    seed: int = setting(0,
        "seeds model init, shuffling and synthetic data", group="Run and loop")
    output_dir: str = setting("/tmp",
        "parent folder of the run directory: a local path, `file://`, or an fsspec URL "
        "(`gs://bucket/runs` with the `gcs` extra): see [Remote run "
        "directories](../checkpoints.md#remote-run-directories)", group="Run and loop")
    per_device_train_batch_size: int = setting(1,
        "pairs per device per micro-batch; global batch = this x devices x "
        "`gradient_accumulation_steps`",
        ge=1, group="Run and loop")
    per_device_eval_batch_size: int | None = setting(None,
        "`null` = the train batch size",
        ge=1, group="Run and loop")
    gradient_accumulation_steps: int = setting(1,
        "micro-batches per optimizer step; the loss is the mean over all pairs of the step",
        ge=1, group="Run and loop")
    max_steps: int | None = setting(10,
        "optimizer steps; `null` to let `n_epochs` decide",
        ge=0, group="Run and loop")
    n_epochs: int | None = setting(None,
        "if set, also stop after this many passes over the training data (whichever of the two "
        "comes first); the data loader cycles and reshuffles each epoch",
        ge=1, group="Run and loop")
    do_first_eval: bool = setting(False,
        "evaluate the untouched model at step 0", group="Run and loop")
    eval_frequency: int = setting(3,
        "evaluate before the update of every step divisible by this (a final eval always runs "
        "after the last step)",
        ge=1, group="Run and loop")
    dry_run: bool = setting(False,
        "keep only 10 global batches of train and of eval data", group="Run and loop")
    shuffle: bool = setting(True,
        "reshuffle the training data each epoch; `false` uses rows in file order",
        group="Run and loop")
    full_precision: bool = setting(False,
        "highest float32 matmul precision; needs both dtypes `float32`", group="Run and loop")
    report_metrics_freq: int = setting(1,
        "log train metrics (averaged since the last report) every N steps",
        ge=1, group="Run and loop")
    plan_memory: bool = setting(False,
        "trace one step of this run on fake tensors at startup, as `moedpo plan` does (in a "
        "process of its own, beside loading: seconds for small models, about a minute for "
        "large ones), and log its per-device peak as `train/memory/planned_peak` beside "
        "`train/memory/measured_peak`, so every run checks the planner. See [Planning]"
        "(../planning.md)", group="Run and loop")
    sample_during_eval: bool = setting(False,
        "at each eval, generate greedy responses for fixed eval prompts into "
        "`run_dir/samples.jsonl` and TensorBoard text", group="Run and loop")
    n_eval_model_samples: int = setting(4,
        "how many eval prompts are sampled",
        ge=1, group="Run and loop")
    sample_max_new_tokens: int = setting(64,
        "length of each sample",
        ge=1, group="Run and loop")
    sample_reference: bool = setting(False,
        "sample the reference model too, side by side", group="Run and loop")
    loggers: list[str] = setting(["tensorboard"],
        "trackers fed the same metric names as `metrics.jsonl`: `tensorboard`, `wandb` (offline "
        "unless `WANDB_MODE` says otherwise; `pip install moedpo[wandb]`), `mlflow` "
        "(`MLFLOW_TRACKING_URI`, else a SQLite store `run_dir/mlflow.db`: `mlflow ui "
        "--backend-store-uri sqlite:///RUN_DIR/mlflow.db`; `pip install moedpo[mlflow]`)",
        choices=LOGGERS, group="Run and loop")
    max_consecutive_nonfinite: int = setting(5,
        "stop after this many steps in a row with a non-finite loss or gradient norm (each such "
        "step is skipped)",
        ge=1, group="Run and loop")
    max_grad_norm: float = setting(0.0,
        "clip the global gradient norm; `0` = no clipping (the norm is still logged)",
        ge=0, group="Optimisation")
    lr: float = setting(5e-7,
        "peak learning rate",
        gt=0, lt=math.inf, group="Optimisation")
    optimizer: str = setting("ADAMW_TORCH_XLA",
        "any `torch.optim` class name (`AdamW`, `RMSprop`, `SGD`, ...); `ADAMW_TORCH_XLA` is "
        "AdamW", group="Optimisation")
    weight_decay: float = setting(0.0,
        "passed to optimizers that take it. Optimizers with a fused kernel (AdamW, Adam, SGD) "
        "use it for plain CPU/CUDA parameters (one pass per step; 3.6x faster than the default "
        "AdamW step on CPU), the multi-tensor path for FSDP-sharded and XLA parameters",
        ge=0, group="Optimisation")
    sched: SchedConfig = section(SchedConfig, "Optimisation")
    beta: float = setting(0.1,
        "DPO temperature",
        gt=0, group="Loss")
    aux_nll_loss_coef: float = setting(0.0,
        "the original's NLL term: the same as adding `sft` to `loss.name` with this weight "
        "(refused beside an explicit `sft`)",
        ge=0, group="Loss")
    loss: LossConfig = section(LossConfig, "Loss")
    reference: ReferenceConfig = section(ReferenceConfig, "Loss")
    use_synthetic_data: bool = setting(True,
        "random-token pairs of exactly `max_length` (first half masked), no dataset needed",
        group="Data")
    label_pad_token_id: int = setting(-100,
        "label of positions that are not scored (negative)",
        lt=0, group="Data")
    pad_token_id: int | None = setting(None,
        "input padding id; `null` (or the original's `-100`) = the tokenizer's pad token, else "
        "EOS", group="Data")
    # Untyped: one name, folder or Hub id, or a list of them.
    datasets: Any = setting("hh",
        "`hh`, `shp`, `os`, `demo` / `demo_chat` (bundled), a folder (local or URL), a Hub "
        "dataset id (`org/name`), or a list of them, e.g. `[hh,shp]` (see "
        "[Datasets](../data.md))", group="Data")
    dataset_dir: dict[str, str | None] = setting({"hh": None, "shp": None, "os": None},
        "local copy of that hub dataset (`dataset_dir.hh`, `.shp`, `.os`) in the hub's layout "
        "(e.g. `train.jsonl.gz`, `test.jsonl.gz`) instead of the hub cache", group="Data")
    max_length: int = setting(512,
        "longest prompt + response, in tokens",
        ge=1, group="Data")
    max_prompt_length: int = setting(256,
        "prompt tokens kept when a pair is too long", group="Data")
    truncation_mode: str = setting("keep_end",
        "which prompt tokens are kept: `keep_end` (the last) or `keep_start`",
        choices=TRUNCATION_MODES, group="Data")
    num_proc: int = setting(1,
        "worker processes for loading `datasets` sources and for tokenising (chat templates "
        "render in Python, one core each: 100k conversational pairs 44 s with 1, 33 s with 2 on "
        "this 2-core machine, same ids)",
        ge=1, group="Data")
    data: DataConfig = section(DataConfig, "Data")
    model: ModelConfig = section(ModelConfig, "Model")
    checkpoint_manager_path: str | None = setting(None,
        "restore weights into policy and reference before training: a "
        "torch.distributed.checkpoint folder, or a folder of numbered step folders (`<step>/` "
        "or moedpo's `step_<step>/`; the newest is used); local or fsspec URL (`gs://` needs "
        "`pip install moedpo[gcs]`)", group="Checkpoints and resume")
    # Untyped: auto, false or a checkpoint path.
    resume: Any = setting("auto",
        "`auto`: continue from the newest complete checkpoint in `checkpoint.dir` if there is "
        "one; `false`: start fresh; a path: continue from that checkpoint",
        group="Checkpoints and resume")
    overwrite: bool = setting(False,
        "with `resume=false`, allow starting over in a run dir that holds checkpoints (they are "
        "deleted)", group="Checkpoints and resume")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints and resume")
    local_compile_cache_dir: str | None = setting(None,
        "persistent XLA compile cache (used by the XLA backend)", group="Parallelism")
    tensor_parallelism: int = setting(1,
        "TPU mesh `(devices / tp, tp)` (used by the XLA backend)",
        ge=1, group="Parallelism")
    parallel: ParallelConfig = section(ParallelConfig, "Parallelism")

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


def settings(node: type = DPOConfig, prefix: str = "", group: str | None = None):
    """(dotted key, dataclass field, reference section) for every `setting` of the schema, in
    declaration order; a nested section's keys inherit its section."""
    for f in fields(node):
        own = f.metadata.get("group") or group
        if "help" in f.metadata:
            yield prefix + f.name, f, own
        elif isinstance(f.default_factory, type) and is_dataclass(f.default_factory):
            yield from settings(f.default_factory, f"{prefix}{f.name}.", own)


# A range's bound: its symbol in messages and the test it stands for.
BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt),
          "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _bounds_text(bounds: dict[str, float]) -> str:
    low = next(((op, v) for op, v in bounds.items() if op in ("ge", "gt")), None)
    high = next(((op, v) for op, v in bounds.items() if op in ("le", "lt")), None)
    if high and high[1] == math.inf:
        return f"a finite number {BOUNDS[low[0]][0]} {low[1]:g}"
    if low and high:
        return (f"in {'[' if low[0] == 'ge' else '('}{low[1]:g}, "
                f"{high[1]:g}{']' if high[0] == 'le' else ')'}")
    op, value = low or high
    return f"{BOUNDS[op][0]} {value:g}"


def accepts(f: Any) -> str:
    """What a setting accepts, in words: its names or its range (empty when only its type)."""
    if f.metadata.get("choices"):
        return "one of " + ", ".join(f.metadata["choices"])
    return _bounds_text(f.metadata["bounds"]) if f.metadata.get("bounds") else ""


def _within(value: float, bounds: dict[str, float]) -> bool:
    return all(BOUNDS[op][1](value, bound) for op, bound in bounds.items())


def check_settings(cfg: DPOConfig) -> None:
    """Every key's own rule, as its `setting` declares it: a name among its choices (each item
    of a list), a number within its range. Raises a one-line ConfigError naming the key."""
    for key, f, _ in settings():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue  # Hydra lets null through only where the type is Optional
        choices = f.metadata.get("choices")
        if choices:
            listed = isinstance(value, list | tuple)
            for item in value if listed else [value]:
                if item not in choices:
                    where = (f"{key}: '{item}' is not one of" if listed
                             else f"{key}={item}: use one of")
                    null = " or null" if "None" in str(f.type) else ""
                    raise ConfigError(f"{where} {', '.join(choices)}{null}")
        bounds = f.metadata.get("bounds")
        if bounds and not (isinstance(value, int | float) and not isinstance(value, bool)
                           and _within(value, bounds)):
            raise ConfigError(f"{key}={value}: must be {_bounds_text(bounds)}")


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
