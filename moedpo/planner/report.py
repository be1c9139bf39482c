"""The plan as a table for people, or one JSON object (`moedpo plan --json`)."""

from __future__ import annotations

from . import Plan

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
