"""Response log-probs straight from the last hidden state, chunk by chunk.

A causal LM's forward ends in `logits = lm_head(hidden)`, a [rows, T, V] tensor that DPO only
needs to reduce to one log-prob per token; in float32 with a 32k-150k vocabulary it is the
largest tensor of the step (rows=16, T=4096, V=32k: 8 GB, kept for backward). While labels
are set (`labels_for(model, labels)`), moedpo's lm_head instead computes, per chunk of
`chunk` tokens, the logits, the label's log-prob and the mean logit (a metric), under
activation checkpointing: only one chunk's logits exist at a time, in forward and backward.

The head module is not replaced (its forward is wrapped on the instance), so parameter
names, checkpoints, exports, FSDP wrapping and generation are unchanged; outside
`labels_for` it is the plain lm_head.

Some models transform the head's output before it is a logit: Granite divides by
`logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2/3 soft-cap it with
`final_logit_softcapping`. The chunks apply the same transform (`LogitTransform.of`). A model
whose forward does something else to its logits after the head (found by reading the
forward's source, the one place that says) keeps full logits, with one log line: a wrong
log-prob is worse than a slower one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .families import head_logits_known

log = logging.getLogger(__name__)
# The transforms applied here, by the config key (or model attribute) the model's forward
# reads, with the value that makes the forward's own transform do nothing: while the head
# returns log-probs, the forward must not scale or cap them again. A forward line after the
# head that touches `logits` and names none of these (nor is a tanh or a float cast) is an
# unknown transform.
NEUTRAL = {"logits_scaling": 1.0, "logit_scale": 1.0, "final_logit_softcapping": None}


@dataclass(frozen=True)
class LogitTransform:
    """logits -> softcap * tanh(scale * logits / softcap) (no cap: scale * logits)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> LogitTransform:
        scale = 1.0
        if getattr(config, "logits_scaling", None):  # Granite, GraniteMoE(-Shared/-Hybrid)
            scale /= config.logits_scaling
        if getattr(config, "logit_scale", None) is not None:  # Cohere, Cohere2
            scale *= config.logit_scale
        return cls(scale, getattr(config, "final_logit_softcapping", None) or None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v p_v^2 of each softmax(logits) row (WPO's weights), without gradient."""
    with torch.no_grad():
        return torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, ignore: int,
                 transform: LogitTransform = LogitTransform(),
                 sum_sq: bool = False) -> torch.Tensor:
    """[N, H] hidden, [N] targets -> [N, 2]: log p(target) (0 where ignored), mean logit;
    [N, 3] with `sum_sq`: and log sum_v p_v^2."""
    logits = transform(F.linear(hidden, weight, bias).float())
    logps = -F.cross_entropy(logits, targets, ignore_index=ignore, reduction="none")
    columns = [logps, logits.detach().mean(-1)]
    if sum_sq:
        columns.append(log_sum_sq_probs(logits))
    return torch.stack(columns, dim=-1)


def chunked_token_logps(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                        ignore: int, chunk: int,
                        transform: LogitTransform = LogitTransform(),
                        sum_sq: bool = False) -> torch.Tensor:
    """[rows, T, H] last hidden states -> [rows, T, 2]: at position t, log p(labels[t+1]) and
    the mean logit; position T-1 (no next label) and ignored labels give log-prob 0. With
    `sum_sq` [rows, T, 3]: log sum_v p_v^2 as well (loss.use_weighting)."""
    rows, length, width = hidden.shape
    targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), ignore)], dim=1).reshape(-1)
    flat = hidden.reshape(-1, width)
    run = _checkpointed if torch.is_grad_enabled() and hidden.requires_grad else _chunk_logps
    parts = [run(flat[i:i + chunk], head.weight, head.bias, targets[i:i + chunk], ignore,
                 transform, sum_sq) for i in range(0, flat.shape[0], chunk)]
    # A new tensor, not a view ([rows, T, 2] is small): FSDP2 cannot hook in-place ops on a
    # view returned by the root module and warns on every forward.
    return torch.cat(parts).view(rows, length, -1).clone()


def _checkpointed(*args) -> torch.Tensor:
    if args[0].device.type == "xla":  # torch.utils.checkpoint knows no XLA device
        from torch_xla.utils.checkpoint import checkpoint as xla_checkpoint

        return xla_checkpoint(_chunk_logps, *args)
    return checkpoint(_chunk_logps, *args, use_reentrant=False)


def enable(model: nn.Module, chunk: int) -> bool:
    """Wrap the output head of `model` (idempotent); False (and full logits) for a model
    whose logits are transformed in a way the chunks cannot reproduce."""
    if not head_logits_known(model):  # the info line says why
        return False
    head = model.get_output_embeddings()
    head.moedpo_transform = LogitTransform.of(model.config)
    if getattr(head, "moedpo_chunk", None) is not None:
        head.moedpo_chunk = chunk
        return True
    plain_forward = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        labels = head.moedpo_labels
        if labels is None:
            return plain_forward(hidden)
        return chunked_token_logps(hidden, head, labels, head.moedpo_ignore, head.moedpo_chunk,
                                   head.moedpo_transform, head.moedpo_sum_sq)

    head.moedpo_chunk, head.moedpo_labels, head.moedpo_ignore = chunk, None, -100
    head.moedpo_sum_sq = False
    head.forward = forward
    return True


def is_enabled(model: nn.Module) -> bool:
    return getattr(model.get_output_embeddings(), "moedpo_chunk", None) is not None


@contextlib.contextmanager
def labels_for(model: nn.Module, labels: torch.Tensor, ignore: int,
               sum_sq: bool = False) -> Iterator[None]:
    """Within this block the model's "logits" output is [rows, T, 2] token log-probs (the
    model's own logit transform, applied in the chunks, is switched off in its forward);
    [rows, T, 3] with `sum_sq`."""
    head = model.get_output_embeddings()
    head.moedpo_labels, head.moedpo_ignore, head.moedpo_sum_sq = labels, ignore, sum_sq
    switched = [(owner, key, getattr(owner, key)) for owner in (model, model.config)
                for key in NEUTRAL if getattr(owner, key, None) is not None]
    for owner, key, _ in switched:
        setattr(owner, key, NEUTRAL[key])
    try:
        yield
    finally:
        head.moedpo_labels, head.moedpo_sum_sq = None, False
        for owner, key, value in switched:
            setattr(owner, key, value)
