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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, ignore: int) -> torch.Tensor:
    """[N, H] hidden, [N] targets -> [N, 2]: log p(target) (0 where ignored), mean logit."""
    logits = F.linear(hidden, weight, bias).float()
    logps = -F.cross_entropy(logits, targets, ignore_index=ignore, reduction="none")
    return torch.stack([logps, logits.detach().mean(-1)], dim=-1)


def chunked_token_logps(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor,
                        ignore: int, chunk: int) -> torch.Tensor:
    """[rows, T, H] last hidden states -> [rows, T, 2]: at position t, log p(labels[t+1]) and
    the mean logit; position T-1 (no next label) and ignored labels give log-prob 0."""
    rows, length, width = hidden.shape
    targets = torch.cat([labels[:, 1:], labels.new_full((rows, 1), ignore)], dim=1).reshape(-1)
    flat = hidden.reshape(-1, width)
    run = _checkpointed if torch.is_grad_enabled() and hidden.requires_grad else _chunk_logps
    parts = [run(flat[i:i + chunk], head.weight, head.bias, targets[i:i + chunk], ignore)
             for i in range(0, flat.shape[0], chunk)]
    # A new tensor, not a view ([rows, T, 2] is small): FSDP2 cannot hook in-place ops on a
    # view returned by the root module and warns on every forward.
    return torch.cat(parts).view(rows, length, 2).clone()


def _checkpointed(*args) -> torch.Tensor:
    if args[0].device.type == "xla":  # torch.utils.checkpoint knows no XLA device
        from torch_xla.utils.checkpoint import checkpoint as xla_checkpoint

        return xla_checkpoint(_chunk_logps, *args)
    return checkpoint(_chunk_logps, *args, use_reentrant=False)


def enable(model: nn.Module, chunk: int) -> None:
    """Wrap the output head of `model` (idempotent)."""
    head = model.get_output_embeddings()
    if getattr(head, "moedpo_chunk", None) is not None:
        head.moedpo_chunk = chunk
        return
    plain_forward = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        labels = head.moedpo_labels
        if labels is None:
            return plain_forward(hidden)
        return chunked_token_logps(hidden, head, labels, head.moedpo_ignore, head.moedpo_chunk)

    head.moedpo_chunk, head.moedpo_labels, head.moedpo_ignore = chunk, None, -100
    head.forward = forward


def is_enabled(model: nn.Module) -> bool:
    return getattr(model.get_output_embeddings(), "moedpo_chunk", None) is not None


@contextlib.contextmanager
def labels_for(model: nn.Module, labels: torch.Tensor, ignore: int) -> Iterator[None]:
    """Within this block the model's "logits" output is [rows, T, 2] token log-probs."""
    head = model.get_output_embeddings()
    head.moedpo_labels, head.moedpo_ignore = labels, ignore
    try:
        yield
    finally:
        head.moedpo_labels = None
