"""Up-front validation of a composed config: names, ranges, combinations and the files they
point at, each failure a one-line `ConfigError` naming the key, before anything loads."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import torch

from .config import (
    DATASET_NAMES,
    OPTIMIZER_ALIASES,
    ConfigError,
    DPOConfig,
    ModelConfig,
    check_settings,
    is_url,
    resolve_model_json,
    resolve_optimizer,
)
from .data.sources import is_hub_id
from .layout import check_rows
from .losses import F_DIVERGENCE_LOSSES, LOSSES, loss_names, needs_reference, unpaired_losses
from .models import lora
from .models.lora import check_init, rewrites_base
from .parallel import Strategy, strategy_class
from .parallel.backend import choose_kind, launched_processes


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# torch.optim classes that cannot train here: LBFGS steps only with a closure that
# recomputes the loss, SparseAdam only on sparse gradients.
UNUSABLE_OPTIMIZERS = {"LBFGS": "LBFGS needs a closure that recomputes the loss each step",
                       "SparseAdam": "SparseAdam takes only sparse gradients"}


def check_expert_parallel(cfg: DPOConfig) -> None:
    ep = cfg.parallel.expert_parallel
    if ep == 1:
        return
    _check(not cfg.model.lora.r, f"parallel.expert_parallel={ep} with model.lora.r="
           f"{cfg.model.lora.r}: LoRA's expert adapters are not sharded by expert yet; set "
           "parallel.expert_parallel=1 (LoRA runs hold one copy of the weights)")


def check_model_json(path: Path) -> None:
    """A model JSON that transformers can build: an object with a known model_type, and a
    top-k no larger than the expert count."""
    from transformers import CONFIG_MAPPING

    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.config_path={path}: invalid JSON ({err})") from None
    _check(isinstance(fields, dict), f"model.config_path={path}: the JSON must be an object of "
           "config fields, e.g. {\"model_type\": \"mixtral\", ...}")
    kind = fields.get("model_type")
    _check(kind in CONFIG_MAPPING, f"model.config_path={path}: model_type={kind!r} is not a "
           "transformers model type (e.g. mixtral, qwen3_moe, llama)")
    check_model_shapes(fields, f"model.config_path={path}")


# Where transformers' MoE configs keep their expert count, by family.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
# Shape fields of transformers' decoder configs that must be whole numbers >= 1 where set
# (a key a family lacks is not checked): what the model is built from, before it is built.
POSITIVE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim",
                   *EXPERT_COUNT_FIELDS, "num_experts_per_tok", "moe_intermediate_size")


def check_model_shapes(fields: dict, where: str) -> None:
    """A model config's shapes that would otherwise fail inside the first forward (or build a
    0-layer model), read from the config transformers builds of `fields` (its defaults
    included): positive whole numbers, key/value heads dividing the heads, an even head size
    for rotary embeddings, a top-k within the experts. `where` names the file."""
    from transformers import CONFIG_MAPPING

    kind = fields.get("model_type")
    if kind not in CONFIG_MAPPING:
        return  # remote code: its own config class checks it
    for key in POSITIVE_FIELDS:  # before transformers sees them: "abc" breaks its defaults
        value = fields.get(key)
        _check(value is None or (isinstance(value, int) and not isinstance(value, bool)
                                 and value >= 1),
               f"{where}: {key}={value!r} must be a whole number >= 1")
    try:
        config = CONFIG_MAPPING[kind](**{k: v for k, v in fields.items() if k != "model_type"})
    except Exception as err:  # noqa: BLE001  (any failure here is the file's: say which)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConfigError(f"{where}: transformers cannot build a {kind} config from it "
                          f"({lines[-1] if lines else type(err).__name__})") from None
    value = {key: getattr(config, key, None) for key in POSITIVE_FIELDS}
    heads, kv = value["num_attention_heads"], value["num_key_value_heads"]
    _check(not (heads and kv) or heads % kv == 0,
           f"{where}: num_key_value_heads={kv} must divide num_attention_heads={heads}")
    head_dim = value["head_dim"]
    if head_dim is None and heads and value["hidden_size"]:
        _check(value["hidden_size"] % heads == 0,
               f"{where}: hidden_size={value['hidden_size']} must be a multiple of "
               f"num_attention_heads={heads} (or set head_dim)")
        head_dim = value["hidden_size"] // heads
    rotary = any(getattr(config, k, None) is not None
                 for k in ("rope_theta", "rope_parameters", "rope_scaling"))
    _check(head_dim is None or not rotary or head_dim % 2 == 0,
           f"{where}: the head size is {head_dim}; rotary embeddings rotate pairs of "
           "dimensions, so it must be even")
    experts = next((value[k] for k in EXPERT_COUNT_FIELDS if value[k]), None)
    top_k = value["num_experts_per_tok"]
    _check(experts is None or top_k is None or top_k <= experts,
           f"{where}: num_experts_per_tok={top_k} is above the {experts} experts")


def check_local_weights(folder: Path) -> None:
    """Every safetensors file of a local model folder has a readable header and all the
    bytes it announces (a truncated download fails here, not after minutes of loading):
    safetensors' own `safe_open` checks both without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"model.name_or_path={folder}: {file.name} is not a complete "
                              f"safetensors file ({first}); download it again") from None


def _writable(path: str) -> bool:
    """Whether a local folder can be created or written (its nearest existing ancestor)."""
    probe = Path(path).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def check_run_location(cfg: DPOConfig) -> None:
    """Where the run writes: a plain exp_name inside a writable output_dir (and checkpoint
    dir). Checked before Hydra creates the run folder (cli.py), so a refused location is
    never written to."""
    name = str(cfg.exp_name)
    _check(name not in ("", ".", "..") and "/" not in name and "\\" not in name,
           f"exp_name={cfg.exp_name}: must be a plain folder name (the run lives in "
           "output_dir/exp_name); put the path in output_dir")
    if not is_url(cfg.output_dir):
        out = Path(str(cfg.output_dir).removeprefix("file://")).expanduser()
        _check(not out.exists() or out.is_dir(),
               f"output_dir={cfg.output_dir}: is a file; give a folder")
        _check(_writable(str(out)), f"output_dir={cfg.output_dir}: not writable; give a "
               "folder you can write")
    ckpt = cfg.checkpoint.dir
    if ckpt and not is_url(ckpt):
        _check(_writable(ckpt.removeprefix("file://")),
               f"checkpoint.dir={ckpt}: not writable; give a folder you can write")


def validate(cfg: DPOConfig) -> None:
    """Raise ConfigError (one line, naming the key) for the first mistake found: each key's
    own rule (the schema's), then the rules between keys, by part of the config."""
    check_run_location(cfg)
    check_settings(cfg)
    check_loop(cfg)
    check_expert_parallel(cfg)
    check_loss(cfg)
    check_model(cfg)
    check_data(cfg)


def check_loop(cfg: DPOConfig) -> None:
    """The run's length, its pairs' lengths and the optimizer."""
    _check(cfg.max_steps is not None or cfg.n_epochs is not None,
           "max_steps=null: set max_steps or n_epochs so the run has an end")
    _check(cfg.use_synthetic_data or 0 <= cfg.max_prompt_length < cfg.max_length,
           f"max_prompt_length={cfg.max_prompt_length}: must be >= 0 and below "
           f"max_length={cfg.max_length}, or responses would be cut to nothing")
    _check(OPTIMIZER_ALIASES.get(cfg.optimizer, cfg.optimizer) not in UNUSABLE_OPTIMIZERS,
           f"optimizer={cfg.optimizer}: {UNUSABLE_OPTIMIZERS.get(cfg.optimizer, '')}; use AdamW "
           "(the default) or another optimizer that steps without help")
    resolve_optimizer(cfg.optimizer)


def check_model(cfg: DPOConfig) -> None:
    """model.*: implementations that fit together, the rows they allow, LoRA, where the run
    goes, and the model files named."""
    _check(not (cfg.model.hub_kernels and choose_kind(cfg.parallel.backend) == "xla"),
           "model.hub_kernels=true: the Hub's kernels package has no XLA kernels (transformers "
           "would fail at the first train()/eval()); set model.hub_kernels=false on TPUs")
    m = cfg.model
    if cfg.full_precision:
        _check(m.policy_dtype == "float32" and m.reference_dtype == "float32",
               f"full_precision=true needs float32 models, got model.policy_dtype="
               f"{m.policy_dtype} model.reference_dtype={m.reference_dtype}")
    _check(m.attn_implementation in ("auto", "eager") or m.flash_attention,
           f"model.flash_attention=false (eager attention) contradicts "
           f"model.attn_implementation={m.attn_implementation}; set only one of them")
    _check(m.moe_implementation in ("auto", "dropped") or m.capacity_factor == 0,
           f"model.capacity_factor={m.capacity_factor} drops tokens, which only "
           f"model.moe_implementation=dropped (or auto) does; it is {m.moe_implementation}")
    _check(m.moe_implementation != "dropped" or m.capacity_factor > 0,
           "model.moe_implementation=dropped needs model.capacity_factor > 0 (e.g. 1.25)")
    check_rows(cfg)
    _check(m.fsdp_config.xla_fsdp_v2, "model.fsdp_config.xla_fsdp_v2=false: torch_xla's FSDP "
           "v1 wrapper is not supported; on XLA moedpo shards through SPMD (FSDP v2, the "
           "seed's default): remove the override")
    check_lora(cfg)
    check_placement(cfg)
    check_model_source(m)


def check_model_source(m: ModelConfig) -> None:
    """model.config_path or model.name_or_path: a model JSON transformers can build, or a
    local folder with complete weights and a sane config.json (a hub id is checked when it
    loads)."""
    if m.config_path is not None:
        check_model_json(resolve_model_json(m.config_path))
    elif m.name_or_path.startswith(("/", "./", "../", "~")) and not Path(
            m.name_or_path).expanduser().is_dir():  # a path, never a hub id
        raise ConfigError(f"model.name_or_path={m.name_or_path}: no such folder; give a "
                          "folder saved with save_pretrained, or a hub id (org/name)")
    elif Path(m.name_or_path).is_dir():
        check_local_weights(Path(m.name_or_path))
        config_json = Path(m.name_or_path) / "config.json"
        try:
            fields = json.loads(config_json.read_text()) if config_json.is_file() else None
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.name_or_path={m.name_or_path}: config.json is not "
                              f"readable JSON ({err})") from None
        if isinstance(fields, dict):
            check_model_shapes(fields, f"model.name_or_path={m.name_or_path} (config.json)")


def check_data(cfg: DPOConfig) -> None:
    """datasets, data.* and dataset_dir: sources that exist, and what streaming excludes."""
    datasets = cfg.datasets
    listed = isinstance(datasets, list | tuple) and all(isinstance(d, str) for d in datasets)
    _check(isinstance(datasets, str) or (listed and len(datasets) > 0),
           f"datasets={datasets}: give a name ({', '.join(DATASET_NAMES)}), a folder, or a list")
    for name in cfg.dataset_list:
        _check(name in DATASET_NAMES or Path(name).expanduser().is_dir() or is_url(name)
               or is_hub_id(name),
               f"datasets: '{name}' is neither a known dataset ({', '.join(DATASET_NAMES)}), "
               "a folder (train and test files: jsonl, json, parquet, csv, or a save_to_disk "
               "folder) nor a Hub dataset id (org/name)")
    if cfg.data.streaming:
        _check(cfg.max_steps is not None and cfg.max_steps > 0,
               "data.streaming=true: the number of training pairs is not known ahead; set "
               "max_steps")
        _check(cfg.n_epochs is None, "data.streaming=true with n_epochs: a stream's epochs are "
                                     "not counted ahead; set max_steps instead")
        for on, key in ((cfg.reference.precompute, "reference.precompute"),
                        (cfg.data.group_by_length, "data.group_by_length"),
                        (cfg.data.weights is not None, "data.weights")):
            _check(not on, f"data.streaming=true with {key}: that needs the whole training set "
                           "up front; drop one of the two")
    weights = cfg.data.weights
    if weights is not None:
        _check(len(weights) == len(cfg.dataset_list) and all(w >= 0 for w in weights)
               and sum(weights) > 0,
               f"data.weights={list(weights)}: give one weight >= 0 per dataset "
               f"({len(cfg.dataset_list)}: {cfg.dataset_list}), not all 0")
    template = cfg.data.chat_template
    _check(template is None or is_url(template) or Path(template).expanduser().is_file(),
           f"data.chat_template={template}: no such file; give a Jinja template file or null "
           "(the tokenizer's own)")
    columns = cfg.data.columns
    _check(columns is None or (isinstance(columns, dict) and all(
        isinstance(v, str) for v in columns.values())),
        f"data.columns={columns}: give renames as {{prompt: KEY, chosen: KEY, rejected: KEY}}")
    for ours in columns or {}:
        _check(ours in ("prompt", "chosen", "rejected", "completion", "label"),
               f"data.columns.{ours}: unknown key; use prompt, chosen, rejected, completion, "
               "label")
    for name, folder in cfg.dataset_dir.items():
        _check(name in ("hh", "shp", "os"),
               f"dataset_dir.{name}: unknown dataset; use dataset_dir.hh, .shp or .os")
        _check(folder is None or Path(folder).expanduser().is_dir(),
               f"dataset_dir.{name}={folder}: no such folder")


def use_meta_init(cfg: DPOConfig, strategy: type[Strategy]) -> bool:
    """`model.meta_init`, by default on wherever the strategy shards the weights so that
    each process fills only its shards (`Strategy.meta_init`: FSDP2 always, SPMD when they
    come from `checkpoint_manager_path`, read shard by shard)."""
    if cfg.model.meta_init is not None:
        return cfg.model.meta_init
    if lora.is_quantized(cfg.model):  # quantized by from_pretrained as it loads
        return False
    return strategy.meta_init(cfg)


def check_placement(cfg: DPOConfig) -> None:
    """What the backend the run goes to (`parallel.backend=auto` resolved as the run will
    resolve it) and its strategy for torchrun's process count cannot run, before any model
    loads: the strategy's own refusals first, then what meta init cannot fill."""
    kind, world = choose_kind(cfg.parallel.backend), launched_processes()
    _check(kind != "cuda" or torch.cuda.is_available(), "parallel.backend=cuda but no CUDA "
           "device is visible; use parallel.backend=auto or cpu")
    strategy = strategy_class(kind, world, cfg)
    for refusal in strategy.refusals(cfg, kind, world):
        raise ConfigError(refusal)
    m, meta = cfg.model, use_meta_init(cfg, strategy)
    _check(not (meta and cfg.checkpoint_manager_path
                and lora.is_enabled(m) and m.lora.init not in lora.SHAPE_ONLY_INITS),
           f"model.lora.init={m.lora.init} computes the adapters from the base weights, which "
           "meta init reads shard by shard from checkpoint_manager_path; set "
           "model.meta_init=false (or model.lora.init=true)")
    _check(not (m.hub_kernels and meta), "model.hub_kernels=true: Hub kernels are chosen for "
           "the device the weights are on, which meta init fills later; set "
           "model.meta_init=false")
    _check(not (meta and lora.is_enabled(m) and rewrites_base(m)
                and needs_reference(loss_names(cfg.loss.name), cfg.loss.reference_free)),
           f"model.lora.init={m.lora.init} rewrites the base weights, so the reference is a "
           "copy of the original base, which meta init cannot fill; set model.meta_init=false")


def check_lora(cfg: DPOConfig) -> None:
    """model.lora: ranges, and what a run with one copy of the weights cannot do."""
    lora, m = cfg.model.lora, cfg.model
    if lora.r == 0:
        return
    check_init(m)
    _check(not (rewrites_base(m) and cfg.checkpoint_manager_path),
           f"model.lora.init={lora.init} rewrites the base it computes from model.name_or_path, "
           "and checkpoint_manager_path's weights would replace that base afterwards; make the "
           "checkpoint a Hugging Face folder (moedpo convert --to-hf) and give it as "
           "model.name_or_path, or use model.lora.init=true")
    why = {"reference.sync_every": cfg.reference.sync_every > 0 and
           "TR-DPO moves the reference, which under LoRA is the frozen base",
           "model.router_bias_update_rate": m.router_bias_update_rate > 0 and
           "the correction biases belong to the base, which is also the reference",
           "reference.cpu_offload": cfg.reference.cpu_offload and
           "there is no separate reference to offload"}
    for key, reason in why.items():
        _check(not reason, f"{key} with model.lora.r={lora.r}: {reason}; turn one of them off")
    if lora.quantize == "4bit":
        _check(not m.config_path, f"model.lora.quantize=4bit with model.config_path="
               f"{m.config_path}: QLoRA quantizes pretrained weights as they load; give "
               "model.name_or_path (an HF folder or hub id) instead")
        _check(importlib.util.find_spec("bitsandbytes") is not None,
               "model.lora.quantize=4bit needs bitsandbytes: pip install 'moedpo[qlora]'")
        _check(cfg.parallel.backend != "xla", "model.lora.quantize=4bit: bitsandbytes has no "
               "XLA kernels; set model.lora.quantize=null on TPUs")
        _check(not m.meta_init, "model.lora.quantize=4bit with model.meta_init=true: the 4-bit "
               "base is quantized as it loads whole; set model.meta_init=false")


def check_loss(cfg: DPOConfig) -> None:
    """loss.*: names in the registry, weights that match them, options in range, and the
    combinations that cannot work (docs/losses/)."""
    loss = cfg.loss
    names = loss_names(loss.name)
    _check(bool(names), "loss.name is empty: give one loss name or a list of them")
    for name in names:
        _check(name in LOSSES, f"loss.name={name}: unknown loss; use one of "
               f"{', '.join(LOSSES)}")
    _check(len(set(names)) == len(names), f"loss.name={names}: a loss is named twice")
    if loss.weights is not None:
        _check(len(loss.weights) == len(names),
               f"loss.weights={list(loss.weights)}: {len(loss.weights)} weights for "
               f"{len(names)} losses {names}; give one weight per name")
        _check(all(math.isfinite(w) and w >= 0 for w in loss.weights),
               f"loss.weights={list(loss.weights)}: weights must be finite and >= 0")
    _check(not (cfg.aux_nll_loss_coef > 0 and "sft" in names),
           f"aux_nll_loss_coef={cfg.aux_nll_loss_coef} with sft in loss.name: both add the "
           "NLL term; keep one (loss.weights sets the sft weight)")
    _check("exo_pair" not in names or loss.label_smoothing > 0,
           "loss.name=exo_pair needs loss.label_smoothing > 0 (its target is (1 - e, e); "
           "the EXO paper uses 1e-3)")
    off = [n for n in names if n not in F_DIVERGENCE_LOSSES]
    _check(loss.f_divergence == "reverse_kl" or not off,
           f"loss.f_divergence={loss.f_divergence} does not apply to {', '.join(off)}: it "
           f"scores the log-ratios of {', '.join(sorted(F_DIVERGENCE_LOSSES))}; use "
           "reverse_kl with these")
    _check(loss.alphapo_alpha != 0, "loss.alphapo_alpha=0 is SimPO: use loss.name=simpo")
    if unpaired_losses(names):
        _check(len(names) == 1, f"loss.name={names}: an unpaired loss (kto, "
               "apo_zero_unpaired) reads rows a pair loss cannot; use it alone")
        _check(loss.ld_alpha is None and not loss.use_weighting,
               "loss.ld_alpha / loss.use_weighting weigh a pair's two responses against each "
               f"other; {names[0]} has one completion a row: leave them off")
    batchwise = [n for n in names if n in ("aot", "aot_unpaired")]
    _check(not (loss.use_weighting and batchwise),
           f"loss.use_weighting=true with {', '.join(batchwise)}: AOT matches pairs by rank "
           "across the batch, so there is no per-pair loss to weight (TRL refuses it too)")
    reference = needs_reference(names, loss.reference_free)
    sync = cfg.reference.sync_every
    _check(not (sync and cfg.reference.precompute),
           f"reference.sync_every={sync} with reference.precompute=true: precomputed "
           "log-probs are of the starting reference; drop one of the two")
    _check(not (sync and not reference),
           f"reference.sync_every={sync} with loss.name={names}: these losses read no "
           "reference to update; set reference.sync_every=0")
    _check(not (cfg.reference.precompute and not reference),
           f"reference.precompute=true with loss.name={names}"
           f"{' and loss.reference_free=true' if loss.reference_free else ''}: these losses "
           "read no reference, so there is nothing to precompute; drop reference.precompute")


def check_rows_fit_losses(cfg: DPOConfig, unpaired: bool) -> None:
    """After the data is read: unpaired rows need an unpaired loss and pairs a pair loss."""
    names = loss_names(cfg.loss.name)
    if unpaired and not unpaired_losses(names):
        raise ConfigError(f"datasets={cfg.datasets} holds unpaired rows (prompt, completion, "
                          f"label) but loss.name={names} compares pairs; set loss.name=kto "
                          "(or apo_zero_unpaired)")
    if not unpaired and unpaired_losses(names):
        raise ConfigError(f"loss.name={names[0]} reads unpaired rows (prompt, completion, "
                          f"label); datasets={cfg.datasets} holds preference pairs: give "
                          "unpaired rows, or a pair loss (sigmoid ...)")
