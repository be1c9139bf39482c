"""The plan as a table for people, or one JSON object (`moedpo plan --json`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Plan

if TYPE_CHECKING:
    from .search import Candidate

GIB = 2**30


def text(plan: Plan) -> str:
    t, hw = plan.traced, plan.hardware
    usable = hw.memory * (1 - plan.margin)
    verdict = "fits" if plan.fits else "does NOT fit"
    rows = [
        ("policy weights", t.parameters), ("gradients", t.gradients),
        ("optimizer state", t.optimizer), ("reference weights", t.reference),
        ("activations, temporaries, gathered layers", t.transient),
    ]
    lines = [
        f"plan: {plan.devices} x {hw.name} ({hw.memory / GIB:.1f} GiB each), strategy "
        f"{t.strategy}; {t.parameter_count / 1e9:.3g}B parameters, "
        f"{t.trainable_count / 1e9:.3g}B trained",
        f"per device, one step of {t.micro_batches} micro-batch(es), {t.tokens} tokens:",
    ]
    lines += [f"  {name:<44} {size / GIB:9.2f} GiB" for name, size in rows]
    lines += [
        f"  {'peak':<44} {t.peak / GIB:9.2f} GiB   {verdict} in {usable / GIB:.1f} GiB "
        f"({plan.margin:.0%} kept free)",
        f"time per step: {plan.step_seconds:.3g} s (compute {plan.compute_seconds:.3g} s, "
        f"collectives {plan.collective_seconds:.3g} s, overlapped); "
        f"{plan.pairs_per_second:.3g} pairs/s, MFU {plan.mfu:.1%}",
        "modelled, not traced: " + "; ".join(plan.modelled),
    ]
    return "\n".join(lines)


def variant_line(c: Candidate) -> str:
    """A variant's searched settings and its verdict, on one line."""
    ch, p = c.changes, c.plan
    return (f"replicate {ch['parallel.replicate']}, expert parallel "
            f"{ch['parallel.expert_parallel']}, micro-batch "
            f"{ch['per_device_train_batch_size']} x {ch['gradient_accumulation_steps']}, "
            f"checkpointing {'on' if ch['model.activation_checkpointing'] else 'off'}: peak "
            f"{p.traced.peak / GIB:.1f} GiB, " + (
                f"{_rate(p.pairs_per_second)} pairs/s" if p.fits else "does not fit"))


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def search_text(candidates: list[Candidate], overrides: list[str], devices: int,
                top: int, not_searched: tuple[str, ...]) -> str:
    """The variants that fit, best first, each with its command line; or why none does."""
    fitting = [c for c in candidates if c.fits][:top]
    if not candidates:
        return "search: nothing to trace"
    hw = candidates[0].plan.hardware
    lines = [f"search: {len(candidates)} variants traced on {devices} x {hw.name}; "
             f"{sum(c.fits for c in candidates)} fit"]
    if not fitting:
        least = min(candidates, key=lambda c: c.plan.traced.peak)
        lines.append(f"none fits in {hw.memory * (1 - least.plan.margin) / GIB:.1f} GiB; the "
                     f"least memory: {variant_line(least)}. More devices, LoRA or "
                     "reference.precompute=true may fit.")
    for rank, c in enumerate(fitting, 1):
        p = c.plan
        lines += [f"{rank}. {variant_line(c)}, step {p.step_seconds:.3g} s, MFU {p.mfu:.1%}",
                  f"   {c.command(overrides, devices, hw)}"]
    lines.append("not searched: " + "; ".join(not_searched))
    return "\n".join(lines)
