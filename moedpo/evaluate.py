"""The evaluation pass (metrics over the eval pairs, per data source when there are several)
and greedy samples for the eval log."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import DPOConfig
from .losses.unpaired import RewardShift
from .metrics import MeanMetrics
from .step import batch_loss


@torch.no_grad()
def evaluate(policy: torch.nn.Module, reference: torch.nn.Module | None, batches,
             cfg: DPOConfig, sync: Callable[[], None] = lambda: None,
             groups: list[str] | None = None, shift: RewardShift | None = None,
             sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
             ) -> MeanMetrics:
    """Metrics over this rank's eval pairs; `batches` yields (collated batch, valid, labels):
    only the first `valid` pairs of a batch count (the rest pad ranks to equal work); with
    `groups` (several data sources), per-pair metrics are also kept by each pair's label.
    `sync` runs the batch's graph on XLA before its metrics are read."""
    was_training = policy.training
    policy.eval()
    metrics = MeanMetrics()
    for batch, valid, labels in batches:
        out = batch_loss(policy, reference, batch, cfg, shift, sum_over_ranks, valid)
        sync()
        if groups:
            metrics.add_grouped({k: v[:valid] for k, v in out.metrics.items()},
                                labels[:valid], groups)
        if valid:
            out.metrics = {k: v[:valid] for k, v in out.metrics.items()}
            metrics.add_output(out)
    policy.train(was_training)
    return metrics


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: list[list[int]],
             max_new_tokens: int) -> list[str]:
    """Greedy continuations, one prompt at a time (a handful of prompts: no padding needed).
    No KV cache: every forward sees the whole sequence, so the dropped MoE's per-sequence
    capacity means what it means in training rather than collapsing on one-token steps."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts = []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    for ids in prompts:  # an empty prompt starts from BOS (or EOS): generate needs a token
        input_ids = torch.tensor([list(ids) or [start]], dtype=torch.long, device=device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, input_ids.shape[1]:],
                                      skip_special_tokens=True).strip())
    model.train(was_training)
    return texts
