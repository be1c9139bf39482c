"""One step of a config traced as the planner traces it, written as JSON to argv[2]:
`fake N` (fake tensors over N fake ranks), `real` (real weights, routing and, under torchrun,
gloo collectives: what the plan is checked against), `whole N` (as `fake`, a deep model traced whole
rather than as two shallow copies), `memtracker` (the real step measured by torch's own
MemTracker instead of the planner's tracker), `flops` (the fake step's FLOPs counted by
torch's FlopCounterMode as well) or `time` (as `real`, with the plan's step time on the `cpu`
entry, timed in this process just before). Each in a process of its own: traces on fake
tensors after real ones in one long-lived process have crashed torch's fake-tensor converter."""

import contextlib
import json
import sys
from pathlib import Path

from moedpo.api import load_config
from moedpo.parallel.backend import init_backend, shutdown
from moedpo.planner import trace as trace_lib


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    world = 1
    if mode in ("fake", "whole"):
        world, *overrides = overrides
    cfg = load_config(overrides=overrides)
    extra = {}
    if mode == "memtracker":
        from torch.distributed._tools.mem_tracker import MemTracker

        class TorchTracker(MemTracker):
            """torch's tracker where the planner's stands: it applies without a frozen model."""

            phase_peaks: dict = {}

            def track(self, tensors):
                pass

            def reset_peak(self):
                self.reset_mod_stats()

            def phase(self, name):
                return contextlib.nullcontext()

            @property
            def peak(self):
                return max(s["Total"] for s in self.get_tracker_snapshot("peak").values())

        trace_lib.StorageTracker = TorchTracker
    if mode == "flops":
        from torch.utils.flop_counter import FlopCounterMode

        class Counting(trace_lib.OpCosts):
            def __enter__(self):
                extra["counter"] = FlopCounterMode(display=False).__enter__()
                return super().__enter__()

            def __exit__(self, *exc):
                super().__exit__(*exc)
                extra["counter"].__exit__(*exc)

        trace_lib.OpCosts = Counting
    if mode in ("fake", "whole", "flops"):
        step = trace_lib.plan_step(cfg, int(world), shallow=mode != "whole")
        main = True
    else:
        if mode == "time":
            from moedpo.planner import plan

            extra["planned_seconds"] = plan(cfg, 1, "cpu").compute_seconds
        backend = init_backend("cpu")
        step = trace_lib.trace_step(cfg, backend, real=True)
        main = backend.is_main
        shutdown(backend)
    if main:
        figures = {k: getattr(step, k) for k in ("parameters", "gradients", "optimizer",
                                                 "reference", "peak", "flops", "state",
                                                 "transient", "exchanged", "tokens")}
        if mode == "time":
            figures["measured_seconds"] = step.measured_seconds
        if "planned_seconds" in extra:
            figures["planned_seconds"] = extra["planned_seconds"]
        if "counter" in extra:
            figures["torch_flops"] = extra["counter"].get_total_flops()
        Path(out).write_text(json.dumps(figures))


if __name__ == "__main__":  # the planner spawns processes that import this module
    main()
