"""`moedpo plan`: whether a configured run fits a device, and how fast it steps, before
paying for the devices. The configured model is built weightless, placed by moedpo's own
strategy over a fake process group of N ranks, and one real training step is traced on fake
tensors (trace.py); its live bytes give the memory per device, its operations a roofline
time (cost.py), and the strategy's collectives a bandwidth model of the links
(hardware.py). See docs/planning.md.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
from dataclasses import dataclass

from ..config import DTYPES, ConfigError, DPOConfig
from .hardware import Hardware, hardware
from .trace import TracedStep, plan_step, traced_depths

log = logging.getLogger("moedpo")

# Kept free of the device's memory for what no trace sees: the allocator's fragmentation
# and cache, the runtime's own buffers (CUDA context, NCCL, XLA programs).
DEFAULT_MARGIN = 0.1


@dataclass
class Plan:
    devices: int
    hardware: Hardware
    traced: TracedStep
    collective_bytes: dict[str, float]  # per device and step, by link
    compute_seconds: float
    collective_seconds: float
    margin: float
    routing_skew: float
    modelled: list[str]  # what the plan models rather than traces

    @property
    def step_seconds(self) -> float:
        """FSDP2 gathers the next layer while this one computes: the longer of the two."""
        return max(self.compute_seconds, self.collective_seconds)

    @property
    def fits(self) -> bool:
        return self.traced.peak <= self.hardware.memory * (1 - self.margin)

    @property
    def pairs_per_second(self) -> float:
        return self.traced.pairs * self.devices / self.step_seconds

    @property
    def mfu(self) -> float:
        """FLOPs done (recomputation of checkpointed layers included) over the device's
        peak for the step's time."""
        return self.traced.flops / (self.step_seconds * self.hardware.bf16_flops)

    def to_json(self) -> dict:
        t = self.traced
        return {
            "fits": self.fits, "devices": self.devices, "hardware": self.hardware.name,
            "strategy": t.strategy, "memory_bytes_per_device": self.hardware.memory,
            "peak_bytes_per_device": t.peak, "state_bytes_per_device": t.state,
            "parameters_bytes": t.parameters, "gradients_bytes": t.gradients,
            "optimizer_bytes": t.optimizer, "reference_bytes": t.reference,
            "transient_bytes": t.transient, "phase_peak_bytes": t.phases,
            "step_seconds": self.step_seconds, "compute_seconds": self.compute_seconds,
            "collective_seconds": self.collective_seconds,
            "collective_bytes_per_device": self.collective_bytes,
            "exchanged_bytes_per_device": t.exchanged,
            "flops_per_device": t.flops, "mfu": self.mfu,
            "pairs_per_second": self.pairs_per_second, "pairs_per_step": t.pairs * self.devices,
            "tokens_per_device_step": t.tokens, "parameters": t.parameter_count,
            "trainable_parameters": t.trainable_count, "margin": self.margin,
            "routing_skew": self.routing_skew, "modelled": self.modelled,
        }


def plan(cfg: DPOConfig, devices: int = 1, device: str | Hardware = "cpu",
         routing_skew: float = 0.0, margin: float = DEFAULT_MARGIN) -> Plan:
    """The plan of `cfg` on `devices` devices of `device` (a name from hardware.py's table,
    a file of an entry, or an entry)."""
    hw = device if isinstance(device, Hardware) else hardware(device)
    check_plannable(cfg, devices)
    return assemble(cfg, devices, hw, plan_step(cfg, devices, routing_skew), routing_skew,
                    margin)


def assemble(cfg: DPOConfig, devices: int, hw: Hardware, traced: TracedStep,
             routing_skew: float, margin: float) -> Plan:
    """The plan from `cfg`'s traced step: its collectives over `hw`'s links, its time, and
    what it models rather than traces."""
    modelled = ["expert loads: balanced" + (f", busiest expert x{1 + routing_skew:g}"
                                            if routing_skew else "")]
    if cfg.parallel.expert_parallel > 1:
        modelled.append("expert parallelism: every rank sends the same loads; this rank "
                        "holds the busiest experts")
    depths = traced_depths(cfg)
    if depths is not None:
        (a, b), full = depths
        modelled.append(f"{full} layers: traced at {a} and {b}, extrapolated (linear in depth)")
    if hw.kind == "xla":
        modelled.append("XLA SPMD planned as FSDP2 over the same devices (same shards; "
                        "XLA's own buffers and fusion not modelled)")
    links = collective_bytes(cfg, traced, devices, hw)
    link_seconds = sum(b / (hw.fast_link if link == "fast" else hw.slow_link)
                       for link, b in links.items())
    return Plan(devices, hw, traced, links, traced.compute_seconds(hw), link_seconds,
                margin, routing_skew, modelled)


def check_plannable(cfg: DPOConfig, devices: int) -> None:
    if devices < 1:
        raise ConfigError(f"--devices {devices}: give at least one device")
    if cfg.parallel.expert_parallel > 1 and (cfg.model.capacity_factor > 0
                                             or cfg.model.moe_implementation == "dropped"):
        raise ConfigError("moedpo plan: parallel.expert_parallel with the dropped MoE "
                          "(model.capacity_factor > 0) is not planned yet (which slots it drops "
                          "depends on the routing); plan the dropless MoE")
    if devices % cfg.parallel.replicate:
        raise ConfigError(f"parallel.replicate={cfg.parallel.replicate}: must divide "
                          f"--devices {devices}")


def collective_bytes(cfg: DPOConfig, traced: TracedStep, devices: int,
                     hw: Hardware) -> dict[str, float]:
    """Bytes each device sends per step over its fast and slow links, as ring collectives
    move them: FSDP2 gathers each weight for the policy's forward and again for its backward
    and the reference's forward (in their compute dtypes), and reduce-scatters the gradients
    in float32, every micro-batch, over the shard group (R groups of devices / R with HSDP);
    with expert parallelism the experts, split E ways, only over their copies in the group
    (devices / R / E), and the routed tokens travel in the all-to-alls the trace counted;
    HSDP then all-reduces each device's gradient shards across the replica groups."""
    links = {"fast": 0.0, "slow": 0.0}
    if devices == 1:
        return links
    replicate, ep = cfg.parallel.replicate, cfg.parallel.expert_parallel
    shard = devices // replicate
    m = cfg.model
    weights = 2 * DTYPES[m.policy_dtype].itemsize + (
        DTYPES[m.reference_dtype].itemsize if traced.reference else 0)
    experts = traced.expert_count if ep > 1 else 0

    def ring(count: float, group: int) -> float:
        return (group - 1) / group * count

    trainable_dense = traced.trainable_count - experts
    within = (ring(traced.parameter_count - experts, shard) * weights
              + ring(experts / ep, shard // ep) * weights
              + ring(trainable_dense, shard) * 4 + ring(experts / ep, shard // ep) * 4)
    links["fast" if shard <= hw.devices_per_node else "slow"] += within * traced.micro_batches
    if ep > 1:  # EP groups are consecutive ranks; the trace counted each micro-batch's rows
        links["fast" if ep <= hw.devices_per_node else "slow"] += ring(traced.exchanged, ep)
    if replicate > 1:  # every micro-batch's shards: FSDP2's HSDP all-reduces per backward
        links["slow"] += 2 * ring(traced.gradients, replicate) * traced.micro_batches
    return links


def planned_peak(cfg: DPOConfig, devices: int) -> int:
    """The traced peak bytes per device of `cfg`'s step on `devices` devices."""
    check_plannable(cfg, devices)
    return plan_step(cfg, devices).peak


class PlannedPeak:
    """`planned_peak`, traced in a spawned process while the run loads (a fake process group
    cannot live beside the run's own): the trainer's `memory/planned_peak`."""

    def __init__(self, cfg: DPOConfig, devices: int) -> None:
        self._pool = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"))
        self._future = self._pool.submit(planned_peak, cfg, devices)
        self._value: int | None = None

    def result(self) -> int | None:
        """Bytes, waiting for the trace the first time; None when it could not be planned
        (said once: a plan never stops a run)."""
        if self._pool is not None:
            try:
                self._value = self._future.result()
                log.info("planned peak per device: %.2f GiB (plan_memory; docs/planning.md)",
                         self._value / 2**30)
            except Exception as err:  # noqa: BLE001 (whatever failed, training goes on)
                log.warning("plan_memory: the step could not be planned (%s: %s); training "
                            "goes on without memory/planned_peak", type(err).__name__, err)
            self._pool.shutdown()
            self._pool = None
        return self._value
