"""Per-sequence sums of response log-probabilities, from logits or from the chunked head.

Inputs are the concatenated batch of the collator: the first half of the rows are chosen
responses, the second half rejected ones, with labels masked outside the response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data.collate import SEGMENT_CHOSEN, SEGMENT_REJECTED
from .models.chunked_head import log_sum_sq_probs


@dataclass
class SequenceLogps:
    """Per-sequence sums over response tokens (rows: chosen..., rejected...)."""

    logps: torch.Tensor  # summed log-probabilities, [2B]
    n_tokens: torch.Tensor  # response tokens, [2B]
    mean_logits: torch.Tensor  # mean raw logit over response positions and vocab, [2B] (metric)
    # WPO (loss.use_weighting): mean over response tokens of log p_t - log sum_v p_v^2, [2B],
    # without gradient; None unless asked for.
    wpo: torch.Tensor | None = None
    # With token weights (LD-DPO), the unweighted sums, [2B]: a response's likelihood, for
    # NLL terms and per-token means; None: `logps` is unweighted.
    plain: torch.Tensor | None = None

    def halves(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = values.shape[0] // 2
        return values[:half], values[half:]


def _sums(values: torch.Tensor, layout: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """[rows, T-1] per-target values -> per-sequence sums: [rows], or for shared-prompt rows
    (`layout`: segments, pair_ids and pair_rows of data.collate_shared, packed or not)
    [2 x pairs]: chosen sums, then rejected, in the pairs' order."""
    if layout is None:
        return values.sum(-1)
    n_pairs = layout["pair_rows"].shape[0]  # from a shape: no device-to-host read
    segment = layout["segments"][:, 1:]  # position t predicts the token at t + 1
    response = (segment == SEGMENT_CHOSEN) | (segment == SEGMENT_REJECTED)
    slot = layout["pair_ids"][:, 1:].clamp(min=0) + n_pairs * (segment == SEGMENT_REJECTED)
    sums = torch.zeros(2 * n_pairs, dtype=values.dtype, device=values.device)
    return sums.index_add(0, slot.reshape(-1), (values * response).reshape(-1))


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, label_pad: int = -100,
                   segments: dict[str, torch.Tensor] | None = None,
                   weights: torch.Tensor | None = None, wpo: bool = False) -> SequenceLogps:
    """Sum of log p(label_t | tokens < t) over positions whose label is not `label_pad`;
    each term times `weights` [rows, T] (aligned with labels: LD-DPO's) where given; with
    `wpo`, WPO's per-sequence log-weight too."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != label_pad
    token_logps = -F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~mask, -100),
                                   ignore_index=-100, reduction="none")
    n_tokens = _sums(mask.long(), segments)
    with torch.no_grad():
        mean_logits = _sums(logits.mean(-1) * mask, segments) / n_tokens.clamp(min=1)
        sum_sq = log_sum_sq_probs(logits) if wpo else None
    return SequenceLogps(_sums(_weighted(token_logps, weights), segments), n_tokens, mean_logits,
                         _wpo(token_logps, sum_sq, mask, n_tokens, segments),
                         _plain(token_logps, weights, segments))


def _wpo(token_logps: torch.Tensor, sum_sq: torch.Tensor | None, mask: torch.Tensor,
         n_tokens: torch.Tensor, segments) -> torch.Tensor | None:
    """WPO's log-weight of each sequence (arXiv 2406.11827, eq. 2, length-normalised as TRL):
    the mean over its tokens of log p_t - log sum_v p_v^2, the log-prob relative to what the
    model's own sampling would give; None without `sum_sq`."""
    if sum_sq is None:
        return None
    with torch.no_grad():
        aligned = (token_logps.detach() - sum_sq) * mask
        return _sums(aligned, segments) / n_tokens.clamp(min=1)


def _weighted(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return values if weights is None else values * weights[:, 1:].to(values.dtype)


def _plain(values: torch.Tensor, weights: torch.Tensor | None, segments) -> torch.Tensor | None:
    return None if weights is None else _sums(values, segments)


def sequence_logps_from_tokens(token_values: torch.Tensor, labels: torch.Tensor,
                                label_pad: int = -100,
                                segments: dict[str, torch.Tensor] | None = None,
                                weights: torch.Tensor | None = None,
                                wpo: bool = False) -> SequenceLogps:
    """The same sums from models.chunked_head's [rows, T, 2] output (per position: log-prob
    of the next label, 0 where it is `label_pad`; mean logit)."""
    mask = labels[:, 1:] != label_pad
    values = token_values[:, :-1]
    n_tokens = _sums(mask.long(), segments)
    with torch.no_grad():
        mean_logits = _sums(values[..., 1] * mask, segments) / n_tokens.clamp(min=1)
    sum_sq = values[..., 2] if wpo else None
    return SequenceLogps(_sums(_weighted(values[..., 0], weights), segments), n_tokens,
                         mean_logits, _wpo(values[..., 0], sum_sq, mask, n_tokens, segments),
                         _plain(values[..., 0], weights, segments))
