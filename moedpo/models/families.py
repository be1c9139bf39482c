"""What individual model families need from moedpo, as explicit tables keyed by
`config.model_type` (read from each family's transformers modeling code, never from its source
text at run time). tests/models/test_families.py checks every entry against the family.

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
