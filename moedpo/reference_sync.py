"""TR-DPO (Gorbatovski et al., arXiv 2404.09656): the reference model is updated during
training, softly (ref <- alpha x policy + (1 - alpha) x ref) or, with alpha 1, by copying
the policy, every `reference.sync_every` steps. Its weights then belong in checkpoints
(train.py saves them beside the policy's)."""

from __future__ import annotations

import torch

from .parallel.fsdp import reshard


@torch.no_grad()
def sync_reference(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """Each reference parameter moves alpha of the way to the policy's, in float32 whatever
    either stores (a bfloat16 reference would lose small steps otherwise). The two models are
    built alike (models.load.build_models) and sharded alike (FSDP2 DTensors or SPMD
    tensors on the same mesh), so parameters pair up by name, shard by shard."""
    for model in (reference, policy):
        reshard(model)
    theirs = dict(policy.named_parameters())
    for name, mine in reference.named_parameters():
        target = theirs[name].detach()
        if target.device != mine.device:  # a CPU-offloaded reference (reference.cpu_offload)
            target = target.to(mine.device)
        mixed = torch.lerp(mine.float(), target.float(), alpha) if alpha < 1 else target
        mine.copy_(mixed.to(mine.dtype))
