"""One real training step of a configured run, traced on fake tensors (no weights, no data):
the model built from its config, placed by moedpo's own strategy over a fake process group
of N ranks, and `step.backward_pass` plus the optimizer run twice on a micro-batch shaped as
configured, while `memory.StorageTracker` counts this rank's live bytes and torch's
`FlopCounterMode` its FLOPs. The second step is the one reported: the optimizer's state
exists from the first.

Dropless routing has data-dependent shapes; the trace assumes balanced loads (tokens x k / E
slots per expert) or a stated skew (the busiest expert gets `1 + skew` times its share).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import DPOConfig
from ..data.synthetic import synthetic_pairs
from ..layout import packing_budget, use_shared_prompt
from ..losses import loss_names, needs_reference
from ..models import lora
from ..models.load import build_models
from ..models.moe import assumed_loads
from ..models.precision import compute_copies, policy_compute_dtype
from ..optim import build_optimizer
from ..parallel import Strategy, make_strategy
from ..parallel.backend import Backend
from ..placement import own_models, place_models
from ..step import backward_pass
from .cost import OpCosts
from .memory import StorageTracker

log = logging.getLogger("moedpo")


@dataclass
class TracedStep:
    """One rank's figures for one optimizer step."""

    strategy: str
    parameters: int  # bytes: the policy's weights on this rank (masters)
    gradients: int
    optimizer: int
    reference: int  # its weights on this rank (0: none, LoRA's, or precomputed)
    peak: int  # bytes alive at the step's busiest moment
    costs: OpCosts  # this rank's operations in `traced` of the step's micro-batches
    tokens: int  # tokens this rank's micro-batches hold (pad included)
    pairs: int  # pairs this rank trains on per step
    micro_batches: int
    traced: int  # micro-batches traced (at most 2: more add nothing new to memory)
    parameter_count: int  # the policy's, unsharded
    trainable_count: int
    phases: dict[str, int] = field(default_factory=dict)  # peak bytes per phase

    @property
    def flops(self) -> float:
        """This rank's FLOPs in one step (every micro-batch; recomputation included)."""
        return self.costs.flops * self.micro_batches / self.traced

    def compute_seconds(self, hw) -> float:
        """The roofline time of this rank's operations in one step on `hw`."""
        return self.costs.seconds(hw, self.micro_batches / self.traced)

    @property
    def state(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.reference

    @property
    def transient(self) -> int:
        """Activations, temporaries and all-gathered weights at the peak."""
        return self.peak - self.state


def balanced_loads(skew: float = 0.0):
    """slots, experts -> slots per expert: equal shares, or the first expert `1 + skew` times
    its share and the rest sharing what is left (the loads sum to `slots`)."""

    def loads(slots: int, experts: int) -> list[int]:
        busiest = min(slots, math.ceil(slots / experts * (1 + skew)))
        rest = slots - busiest
        shares = [rest // (experts - 1) + (i < rest % (experts - 1)) for i in range(experts - 1)]
        return [busiest, *shares] if experts > 1 else [slots]
    return loads


@contextlib.contextmanager
def fake_world(world: int) -> Iterator[Backend]:
    """A backend that is rank 0 of `world` CPU processes, joined by torch's fake process
    group (collectives return at once, moving nothing)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("moedpo plan runs outside a distributed job (a process group exists)")
    if world > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield Backend("cpu", torch.device("cpu"), 0, world, 0)
    finally:
        if world > 1:
            dist.destroy_process_group()


def step_batches(cfg: DPOConfig, parallel: Strategy, policy: torch.nn.Module,
                 vocab: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """This rank's micro-batches of one step, laid out as the trainer lays them (shared
    prompt, packing), from pairs of max_length tokens (half prompt); (batches, pairs)."""
    from ..trainer import batch_maker

    shared = use_shared_prompt(cfg, False, policy)
    max_tokens = packing_budget(cfg, shared, policy, False)
    make = batch_maker(cfg, _PadOnly(), parallel, shared, max_tokens)
    pairs = cfg.per_device_train_batch_size
    batch = make(synthetic_pairs(pairs, cfg.max_length, vocab, cfg.seed))
    if cfg.reference.precompute:
        batch["reference_logps"] = torch.zeros(2 * pairs, dtype=torch.float64)
    # Two micro-batches show what accumulation keeps between them; more add nothing new.
    count = min(cfg.gradient_accumulation_steps, 2)
    return [batch] * count, pairs * cfg.gradient_accumulation_steps


class _PadOnly:
    pad_token_id = 0


def local_bytes(tensors) -> int:
    """Bytes of this rank's shards (a DTensor's local tensor; a plain tensor whole)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def plan_step(cfg: DPOConfig, world: int, skew: float = 0.0) -> TracedStep:
    """Rank 0's memory and FLOPs of one training step of `cfg` on `world` processes, traced
    on fake tensors over a fake process group."""
    with fake_world(world) as backend, warnings.catch_warnings():
        # torch warns when its own module code asks a fake tensor for its data pointer.
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        return trace_step(cfg, backend, skew)


def trace_step(cfg: DPOConfig, backend: Backend, skew: float = 0.0,
               real: bool = False) -> TracedStep:
    """This rank's memory and FLOPs of one training step of `cfg` on `backend`: on fake
    tensors with the assumed expert loads, or (`real`) on real weights and routing, the
    measurement the plan is checked against."""
    # Batches are made outside the fake mode: real (small) index tensors, as the trainer's.
    fake = contextlib.nullcontext() if real else FakeTensorMode(allow_non_fake_inputs=True)
    loads = contextlib.nullcontext() if real else assumed_loads(balanced_loads(skew))
    with loads:
        parallel = make_strategy(cfg, backend)
        with_reference = (needs_reference(loss_names(cfg.loss.name), cfg.loss.reference_free)
                          and not cfg.reference.precompute)
        with fake:
            policy, reference = build_models(cfg.model, cfg.seed, with_reference=with_reference)
            counts = (sum(p.numel() for p in policy.parameters()),
                      sum(p.numel() for p in policy.parameters() if p.requires_grad))
            policy, reference = place_models(parallel, policy, reference)
        vocab = policy.get_input_embeddings().num_embeddings
        batches, pairs = step_batches(cfg, parallel, policy, vocab)
        tracker, costs = StorageTracker(), OpCosts()
        with fake:
            params = [p for p in policy.parameters() if p.requires_grad]
            optimizer = build_optimizer(cfg, params)
            computing = partial(compute_copies, policy,
                                policy_compute_dtype(cfg.model, backend.distributed))
            weights = [1.0 / len(batches)] * len(batches)
            step = partial(backward_pass, policy, reference, batches, weights, cfg,
                           optimizer, params, parallel, computing=computing)
            with tracker:
                tracker.track(t for m in own_models(policy, reference) for t in
                              (*m.parameters(), *m.buffers()))
                # The first step records each operation's cost and makes the optimizer's state.
                with costs:
                    step()
                    optimizer.step()
                # Cyclic garbage dies whenever Python's collector happens to run: collected
                # now and kept off for the measured step, so every trace counts the same.
                gc.collect()
                gc.disable()
                try:
                    tracker.reset_peak()
                    with tracker.phase("forward and backward"):
                        step()
                    with tracker.phase("optimizer"):
                        optimizer.step()
                finally:
                    gc.enable()
        frozen = reference is None or isinstance(reference, lora.AdaptersOff)
        return TracedStep(
            strategy=parallel.name,
            parameters=local_bytes(policy.parameters()),
            gradients=local_bytes(p.grad for p in params),
            optimizer=local_bytes(v for s in optimizer.state.values() for v in s.values()
                                  if isinstance(v, torch.Tensor)),
            reference=0 if frozen else local_bytes(reference.parameters()),
            peak=tracker.peak, costs=costs, traced=len(batches),
            tokens=sum(int(b["input_ids"].numel()) for b in batches)
            * cfg.gradient_accumulation_steps // len(batches),
            pairs=pairs, micro_batches=cfg.gradient_accumulation_steps,
            parameter_count=counts[0], trainable_count=counts[1],
            phases=dict(tracker.phase_peaks))
