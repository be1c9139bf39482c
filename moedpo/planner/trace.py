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

import concurrent.futures
import contextlib
import gc
import logging
import math
import multiprocessing
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import DPOConfig
from ..data.collate import HOST_KEYS
from ..data.synthetic import synthetic_pairs
from ..layout import batch_maker, packing_budget, use_shared_prompt
from ..losses import loss_names, needs_reference
from ..models import lora
from ..models.load import build_models, model_config
from ..models.moe import assumed_loads, experts_modules
from ..models.precision import compute_copies, policy_compute_dtype
from ..optim import build_optimizer
from ..parallel import Strategy, make_strategy
from ..parallel.backend import Backend
from ..placement import own_models, place_models
from ..private_api import non_persistent_buffers
from ..step import backward_pass
from .cost import Costs, OpCosts
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
    # this rank's operations in `traced` of the step's micro-batches, each recording with its
    # weight (one of weight 1; two when extrapolated from shallow copies, `extrapolate`)
    costs: list[tuple[float, Costs]]
    tokens: int  # tokens this rank's micro-batches hold (pad included)
    pairs: int  # pairs this rank trains on per step
    micro_batches: int
    traced: int  # micro-batches traced (at most 2: more add nothing new to memory)
    parameter_count: int  # the policy's, unsharded
    trainable_count: int
    expert_count: int = 0  # of parameter_count: the routed experts' (expert parallelism)
    phases: dict[str, int] = field(default_factory=dict)  # peak bytes per phase
    # wall seconds of the measured step: the device's time on real tensors only (a fake
    # step's time is the host's), what the plan's time is checked against
    measured_seconds: float = 0.0

    @property
    def exchanged(self) -> float:
        """Bytes this rank puts into all-to-alls in one step (expert parallelism)."""
        return sum(w * c.exchanged for w, c in self.costs) * self.micro_batches / self.traced

    @property
    def flops(self) -> float:
        """This rank's FLOPs in one step (every micro-batch; recomputation included)."""
        return sum(w * c.flops for w, c in self.costs) * self.micro_batches / self.traced

    def compute_seconds(self, hw) -> float:
        """The roofline time of this rank's operations in one step on `hw`."""
        return sum(w * c.seconds(hw) for w, c in self.costs) * self.micro_batches / self.traced

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


def unfilled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's device tensors as new tensors of the same shapes and dtypes (under a fake
    mode: fake ones), the host-side layout as it is. The trace reads no device value; and
    torch's converter of real tensors into fake ones has crashed a process's second trace
    (torch 2.13, `meta_utils.describe_tensor`), which tensors made in the mode never meet."""
    return {k: v if k in HOST_KEYS else torch.empty(v.shape, dtype=v.dtype)
            for k, v in batch.items()}


class _PadOnly:
    pad_token_id = 0


def with_storage(model: torch.nn.Module) -> torch.nn.Module:
    """`model`'s meta parameters and buffers as new CPU tensors (under a fake mode: fake
    ones), shared ones staying shared. By hand: `Module.to_empty` swaps a parameter it meets
    twice (a tied or shared one) once it is fake, which the fake mode refuses."""
    made: dict[int, torch.Tensor] = {}

    def new(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            fresh = torch.empty_like(t, device="cpu")
            made[id(t)] = (torch.nn.Parameter(fresh, t.requires_grad)
                           if isinstance(t, torch.nn.Parameter) else fresh)
        return made[id(t)]

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, new(param))
        transient = non_persistent_buffers(module)
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, new(buffer), persistent=name not in transient)
    return model


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


def plan_step(cfg: DPOConfig, world: int, skew: float = 0.0,
              shallow: bool = True) -> TracedStep:
    """Rank 0's memory and FLOPs of one training step of `cfg` on `world` processes, traced
    on fake tensors over a fake process group. A deep model is traced as two shallow copies
    and extrapolated to its depth (`traced_depths`); `shallow=False` traces it whole."""
    parts, combine = step_parts(cfg, shallow)
    if len(parts) == 1:
        return combine([traced_alone(parts[0], world, skew)])
    with tracing_pool(len(parts)) as pool:
        return combine(list(pool.map(traced_alone, parts, [world] * 2, [skew] * 2)))


def step_parts(cfg: DPOConfig, shallow: bool = True
               ) -> tuple[list[DPOConfig], Callable[[list[TracedStep]], TracedStep]]:
    """The configs to trace for `cfg`'s step and how their traces make it: `cfg` itself, or
    two shallow copies of a deep model and the line through them (`traced_depths`)."""
    depths = traced_depths(cfg) if shallow else None
    if depths is None:
        return [cfg], lambda steps: steps[0]
    (a, b), full = depths
    return ([with_depth(cfg, a), with_depth(cfg, b)],
            lambda steps: extrapolate(steps[0], steps[1], (full - a) / (b - a)))


def tracing_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Processes for traces, one trace each: a second fake trace in a process has crashed
    inside torch (torch 2.13: segfaults in the fake-tensor converter and dispatch cache,
    about one run in four, with or without moedpo's trackers); a fresh interpreter per trace
    never did. Spawned, so the children share no state with this process."""
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)


def traced_alone(cfg: DPOConfig, world: int, skew: float = 0.0) -> TracedStep:
    """`trace_step` on fake tensors over a fake group of `world` ranks."""
    with fake_world(world) as backend, warnings.catch_warnings():
        # torch warns when its own module code asks a fake tensor for its data pointer.
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
        return trace_step(cfg, backend, skew)


def traced_depths(cfg: DPOConfig) -> tuple[tuple[int, int], int] | None:
    """((a, b), depth): the two depths a deep model is traced at, or None to trace it whole.
    Every figure of a step is linear in the number of decoder layers alike (each holds the
    same weights, gradients, optimizer state and saved activations; what happens once, the
    embeddings, the head, the reference's forward, is the same at any depth), so two
    shallow traces give the whole model's exactly. The depths keep the layers that differ:
    DeepSeek's leading dense layers, and a period of 2 for alternating attention (gpt-oss);
    at 2 layers FSDP2's peak is not yet on the line (measured), from 3 on it is."""
    config = model_config(cfg.model)
    full = config.num_hidden_layers
    if getattr(config, "mlp_only_layers", None):  # irregular layers: traced whole
        return None
    first = getattr(config, "first_k_dense_replace", 0) or 0
    a, b = first + 4, first + 6
    return ((a, b), full) if full > b else None


def with_depth(cfg: DPOConfig, layers: int) -> DPOConfig:
    """`cfg` with a model of its first `layers` decoder layers."""
    config = model_config(cfg.model)
    overrides = {**cfg.model.config_overrides, "num_hidden_layers": layers}
    if isinstance(getattr(config, "layer_types", None), list):
        overrides["layer_types"] = config.layer_types[:layers]
    return replace(cfg, model=replace(cfg.model, config_overrides=overrides))


def extrapolate(a: TracedStep, b: TracedStep, t: float) -> TracedStep:
    """The step at depth a + t (b - a), every figure on the line through a's and b's."""
    def line(x: float, y: float) -> int:
        return round(x + t * (y - x))

    numbers = {name: line(getattr(a, name), getattr(b, name)) for name in (
        "parameters", "gradients", "optimizer", "reference", "peak", "parameter_count",
        "trainable_count", "expert_count")}
    return TracedStep(
        strategy=a.strategy, **numbers, tokens=a.tokens, pairs=a.pairs,
        micro_batches=a.micro_batches, traced=a.traced,
        costs=[(w * (1 - t), c) for w, c in a.costs] + [(w * t, c) for w, c in b.costs],
        phases={k: line(a.phases[k], b.phases[k]) for k in a.phases if k in b.phases})


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
        # PEFT moves new adapters to their base layer's device, which a module of fake
        # tensors refuses (torch swaps fake parameters, and its fake mode holds weak
        # references to them); PEFT skips adapters on the meta device: a LoRA model is built
        # there and given fake storage after.
        adapters = lora.is_enabled(cfg.model) and not real
        models = build_models(cfg.model, cfg.seed, with_reference=with_reference,
                              on_meta=True) if adapters else None
        with fake:
            policy, reference = models or build_models(cfg.model, cfg.seed,
                                                       with_reference=with_reference)
            if adapters:
                policy, reference = (m if m is None else with_storage(m)
                                     for m in (policy, reference))
            counts = (sum(p.numel() for p in policy.parameters()),
                      sum(p.numel() for p in policy.parameters() if p.requires_grad),
                      sum(p.numel() for m in experts_modules(policy) for p in m.parameters()))
            policy, reference = place_models(parallel, policy, reference)
        vocab = policy.get_input_embeddings().num_embeddings
        batches, pairs = step_batches(cfg, parallel, policy, vocab)
        tracker, costs = StorageTracker(), OpCosts()
        with fake:
            params = [p for p in policy.parameters() if p.requires_grad]
            optimizer = build_optimizer(cfg, params)
            computing = partial(compute_copies, policy,
                                policy_compute_dtype(cfg.model, backend.distributed))
            if not real:  # made here, not converted from the real batch (see `unfilled`)
                batches = [unfilled(batch) for batch in batches]
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
                    start = time.perf_counter()
                    with tracker.phase("forward and backward"):
                        step()
                    with tracker.phase("optimizer"):
                        optimizer.step()
                    seconds = time.perf_counter() - start
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
            peak=tracker.peak, costs=[(1.0, costs.recorded)], traced=len(batches),
            tokens=sum(int(b["input_ids"].numel()) for b in batches)
            * cfg.gradient_accumulation_steps // len(batches),
            pairs=pairs, micro_batches=cfg.gradient_accumulation_steps,
            parameter_count=counts[0], trainable_count=counts[1], expert_count=counts[2],
            phases=dict(tracker.phase_peaks), measured_seconds=seconds)
