"""The DPO loss of one collated batch, and the evaluation pass."""

from __future__ import annotations

import torch

from .config import DPOConfig
from .loss import DPOOutput, SequenceLogps, dpo_loss, sequence_logps
from .metrics import MeanMetrics


def batch_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                label_pad: int) -> SequenceLogps:
    """One forward over chosen and rejected together (one kernel launch, one graph)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    return sequence_logps(logits, batch["labels"], label_pad)


def batch_loss(policy: torch.nn.Module, reference: torch.nn.Module | None,
               batch: dict[str, torch.Tensor], cfg: DPOConfig) -> DPOOutput:
    policy_logps = batch_logps(policy, batch, cfg.label_pad_token_id)
    reference_logps = None
    if reference is not None:
        with torch.no_grad():
            reference_logps = batch_logps(reference, batch, cfg.label_pad_token_id)
    return dpo_loss(policy_logps, reference_logps, cfg.beta, cfg.loss.name,
                    cfg.loss.label_smoothing, cfg.aux_nll_loss_coef)


@torch.no_grad()
def evaluate(policy: torch.nn.Module, reference: torch.nn.Module | None, batches,
             cfg: DPOConfig) -> dict[str, float]:
    """Mean metrics over every eval pair; `batches` yields collated batches."""
    was_training = policy.training
    policy.eval()
    metrics = MeanMetrics()
    for batch in batches:
        metrics.add(batch_loss(policy, reference, batch, cfg).metrics)
    policy.train(was_training)
    return metrics.means()
