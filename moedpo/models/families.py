"""What individual model families need from moedpo, as explicit tables keyed by
`config.model_type`, never read from a family's source text at run time (a reworded forward
in a minor transformers release must not silently change which path runs).
tests/models/test_families.py checks every entry against the family's own behaviour, built
tiny from its config class. A family missing from a table gets the safe path and one info
line saying so; adding it is one line here and one case there.

DPO compares the policy (training) with the reference (eval mode) on the same tokens: anything
random in a family's train-mode forward makes the two differ at step 0 for no gain, so it is
turned off here, and only that: a setting the eval forward reads stays as the family has it.
"""

from __future__ import annotations

import logging

import torch
from transformers import PretrainedConfig

log = logging.getLogger(__name__)

# Train-mode input noise (config keys): the router's input multiplied by uniform noise in
# [1 - x, 1 + x] while training. Not PhiMoE's `router_jitter_noise`: that is its
# sparsemixer's selection threshold, used in eval too (zeroing it changes the forward).
TRAIN_NOISE: dict[str, tuple[str, ...]] = {
    "mixtral": ("router_jitter_noise",),
    "minimax": ("router_jitter_noise",),
    "minimax_m2": ("router_jitter_noise",),
    "phimoe": ("input_jitter_noise",),
}

# Routers that sample their experts in train mode (PhiMoE's SparseMixer: Gumbel sampling among
# the experts within the threshold, a Heun's-method gradient estimate). They keep choosing as
# in eval, the top-k within the threshold, gradients through the chosen experts' softmax
# weights; the reference routes the same way, so step 0 starts at the reference.
SAMPLED_ROUTERS: dict[str, str] = {
    "phimoe": "PhimoeTopKRouter",
}


# Families whose causal-LM logits are the output head's, changed at most in the ways
# chunked_head.LogitTransform reproduces from config keys (`logits_scaling`, `logit_scale`,
# `final_logit_softcapping`): log-probs may come from the last hidden state in chunks. Others
# get full logits (model.logps_chunk_size has no effect).
HEAD_LOGITS: frozenset[str] = frozenset({
    "apertus", "arcee", "bloom", "cohere", "cohere2", "deepseek_v2", "deepseek_v3", "dots1",
    "ernie4_5", "ernie4_5_moe", "exaone4", "flex_olmo", "gemma", "gemma2", "gemma3_text",
    "glm4_moe", "gpt2", "gpt_bigcode", "gpt_neox", "gpt_oss", "granite", "granitemoe",
    "granitemoeshared", "helium", "hunyuan_v1_moe", "jamba", "jetmoe", "llama", "llama4_text",
    "minimax", "minimax_m2", "ministral", "ministral3", "mistral", "mixtral", "nemotron", "olmo",
    "olmo2", "olmo3", "olmoe", "opt", "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "seed_oss", "smollm3", "stablelm", "starcoder2", "vaultgemma",
})

# Families whose decoder takes, in place of one attention mask, a mapping from layer type
# ("full_attention", "sliding_attention") to a 4-D mask: the shared-prompt layout of a model
# that mixes sliding and full attention layers needs it (layout.shared_prompt_attention).
MASK_PER_LAYER_TYPE: frozenset[str] = frozenset({
    "beam", "cohere2", "cohere2_moe", "cwm", "exaone4", "flint", "gemma2", "gemma3_text",
    "gemma4_unified_text", "gpt_oss", "granite_swa", "granitemoe_swa", "minimax_m3_vl_text",
    "ministral", "olmo3", "qwen2", "qwen2_moe", "qwen3", "vaultgemma",
})

# How each MoE family's router turns its logits into expert scores, which the router
# load-balancing loss and statistics use as the router's own probabilities (models/router.py).
# PhiMoE's sparsemixer masks a softmax per choice; its scores are the softmax.
ROUTER_SCORES: dict[str, str] = {
    "deepseek_v2": "softmax", "deepseek_v3": "sigmoid", "dots1": "sigmoid",
    "ernie4_5_moe": "softmax", "flex_olmo": "softmax", "glm4_moe": "sigmoid",
    "gpt_oss": "softmax", "granitemoe": "softmax", "granitemoeshared": "softmax",
    "hunyuan_v1_moe": "softmax", "minimax": "softmax", "minimax_m2": "sigmoid",
    "mixtral": "softmax", "olmoe": "softmax", "phimoe": "softmax", "qwen2_moe": "softmax",
    "qwen3_moe": "softmax",
}


def family(model: torch.nn.Module) -> str | None:
    """The model's `config.model_type` when its forward is transformers' own (not remote code
    or a user's subclass, whose forward may differ from the family's); None otherwise.
    A PEFT model is looked through (`get_base_model`); FSDP2 keeps the class's forward."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        model = get_base()
    forward = getattr(type(model), "forward", None)
    if not getattr(forward, "__module__", "").startswith("transformers."):
        return None
    return getattr(getattr(model, "config", None), "model_type", None)


def _unknown(kind: str, model_type: str | None, consequence: str) -> None:
    log.info("%s is not in moedpo's table of %s (moedpo/models/families.py): %s",
             model_type or "a model whose forward is not transformers' own", kind, consequence)


def _in_table(model: torch.nn.Module, table: frozenset[str], kind: str,
              consequence: str) -> bool:
    known = family(model) in table
    if not known:
        _unknown(kind, family(model), consequence)
    return known


def head_logits_known(model: torch.nn.Module) -> bool:
    """Whether the model's logits are its output head's as chunked_head reproduces them."""
    return _in_table(model, HEAD_LOGITS, "families whose logits are the output head's",
                     "log-probs from full logits (model.logps_chunk_size has no effect)")


def takes_mask_per_layer_type(model: torch.nn.Module) -> bool:
    """Whether the model takes a mask per layer type (MASK_PER_LAYER_TYPE)."""
    return _in_table(model, MASK_PER_LAYER_TYPE, "families that take a mask per layer type",
                     "shared prompts stay off where its layers mix sliding and full attention")


def router_score(model: torch.nn.Module) -> str:
    """`softmax` or `sigmoid`: ROUTER_SCORES, else the config's public `scoring_func` (as
    DeepSeek-style configs name it), else softmax, with an info line."""
    name = family(model)
    if name in ROUTER_SCORES:
        return ROUTER_SCORES[name]
    stated = getattr(getattr(model, "config", None), "scoring_func", None)
    if stated in ("softmax", "sigmoid"):
        return stated
    _unknown("router score functions", name, "router losses and statistics take the softmax "
             "of its router logits as its expert probabilities")
    return "softmax"


def without_train_noise(config: PretrainedConfig) -> PretrainedConfig:
    """Dropout probabilities and the family's train-mode input noise set to 0 in `config`."""
    noise = TRAIN_NOISE.get(getattr(config, "model_type", None), ())
    for key, value in config.to_dict().items():
        dropout = "dropout" in key or key.endswith("_pdrop")
        if isinstance(value, float) and (dropout or key in noise):
            setattr(config, key, 0.0)
    return config


def _train_as_eval(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return torch.nn.Module.train(self, False)


def deterministic_routing(model: torch.nn.Module) -> int:
    """Keep the family's sampling routers in eval mode whatever `model.train()` says (their
    `train` is bound per instance, so copies of the model keep it). Returns how many."""
    name = SAMPLED_ROUTERS.get(getattr(model.config, "model_type", None))
    if name is None:
        return 0
    routers = [m for m in model.modules() if type(m).__name__ == name]
    for router in routers:
        router.train = _train_as_eval.__get__(router)
        router.train(False)
    if routers:
        log.info("%s: its %d routers choose experts as in eval while training (their sampled "
                 "training routing would move the policy off the reference at step 0)",
                 model.config.model_type, len(routers))
    return len(routers)
