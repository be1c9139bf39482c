"""Where the default training step's time goes: torch.profiler over optimizer steps of the
benchmark's Mixtral (`--size tiny|small`, benchmarks/throughput.py) on the demo pairs with
moedpo's defaults (shared prompt on, live reference, AdamW, fp32, one process), reporting the
share of CPU time in matmul kernels, the MFU of the matmuls actually run (the profiler's FLOP
count over the unprofiled wall time, against a matmul peak timed on the spot) and the top
operators by self time.

    python benchmarks/profile_step.py --size small   # -> benchmarks/results/profile_step.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import (  # noqa: E402
    build_model,
    demo_pairs,
    long_pairs,
    matmul_peak,
    write_pairs,
)

# Kernels that are matrix products (the useful work of a transformer step).
MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::baddbmm",
           "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::matmul")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--data", choices=["short", "long"], default="short",
                        help="the demo pairs (max_length 256) or throughput.py's long-prompt "
                        "pairs (max_length 1024)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides on top of the defaults, e.g. data.packing=true")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "profile_step.json")
    args = parser.parse_args()

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from moedpo.config import register_schema
    from moedpo.data import build_data
    from moedpo.layout import batch_maker, packing_budget, use_shared_prompt
    from moedpo.optim import build_optimizer
    from moedpo.parallel import make_strategy
    from moedpo.parallel.backend import init_backend
    from moedpo.placement import load_models
    from moedpo.step import batch_loss

    register_schema()
    with tempfile.TemporaryDirectory() as tmp:
        # First, as in a run: the backend sets the host allocator up before any large tensor.
        backend = init_backend("cpu")
        build_model(args.size, Path(tmp) / "model")
        max_length = 1024 if args.data == "long" else 256
        write_pairs(Path(tmp) / "data", long_pairs() if args.data == "long" else demo_pairs())
        overrides = [f"model.name_or_path={Path(tmp) / 'model'}", "use_synthetic_data=false",
                     f"datasets=[{Path(tmp) / 'data'}]",
                     f"per_device_train_batch_size={args.batch}",
                     f"max_length={max_length}", f"max_prompt_length={max_length // 2}",
                     "optimizer=AdamW", "model.policy_dtype=float32",
                     "model.reference_dtype=float32", f"output_dir={tmp}", "dry_run=true",
                     *args.set]
        with initialize_config_module("moedpo.conf", version_base=None):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
        parallel = make_strategy(cfg, backend)
        tokenizer, policy, reference = load_models(cfg, parallel)
        data = build_data(cfg, tokenizer, policy.get_input_embeddings().num_embeddings)
        shared = use_shared_prompt(cfg, False, policy)
        to_batch = batch_maker(cfg, tokenizer, parallel, shared,
                               packing_budget(cfg, shared, policy))
        optimizer = build_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad])

        def step(i: int) -> None:
            pairs = data.train[i * args.batch:(i + 1) * args.batch]
            optimizer.zero_grad(set_to_none=True)
            batch_loss(policy, reference, to_batch(pairs), cfg).loss.backward()
            optimizer.step()

        step(0)  # warm-up
        # Wall time without the profiler's overhead, then the same steps' operators under it.
        started = time.perf_counter()
        for i in range(1, args.steps + 1):
            step(i)
        wall = (time.perf_counter() - started) / args.steps
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, with_flops=True) as prof:
            for i in range(1, args.steps + 1):
                step(i)
        peak = matmul_peak("cpu", "float32")
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    # FLOPs of the matrix products actually run (the profiler counts mm/addmm/bmm; attention
    # kernels are not counted, so this is a lower bound), against the timed matmul peak.
    flops = sum(e.flops for e in events if e.key in MATMULS) / args.steps
    mfu = flops / wall / (peak * 1e9)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    rows = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / args.steps,
             "share": e.self_cpu_time_total / total, "calls": e.count // args.steps}
            for e in top]
    lines_mfu = (f"step {wall * 1e3:.0f} ms wall (unprofiled), {flops / 1e9:.1f} GFLOP of "
                 f"matmuls actually run per step, matmul peak {peak:.0f} GFLOP/s: MFU "
                 f"{100 * mfu:.0f}% (attention kernels not counted)")
    setting = " ".join(args.set) or "defaults (shared prompt)"
    lines = [f"{args.size} model, {args.data} pairs, batch {args.batch}, {setting}, per step: "
             f"{total / 1e3 / args.steps:.0f} ms CPU self time, {100 * matmul / total:.0f}% "
             "in matmul kernels", lines_mfu, "", "| op | self ms/step | share | calls/step |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['op']} | {r['self_ms']:.1f} | {100 * r['share']:.1f}% | {r['calls']} |"
              for r in rows]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "data": args.data, "set": args.set,
                                    "batch": args.batch,
                                    "matmul_share": matmul / total,
                                    "step_cpu_ms": total / 1e3 / args.steps,
                                    "step_wall_ms": wall * 1e3, "matmul_gflop": flops / 1e9,
                                    "peak_gflops": peak, "mfu_matmuls_run": mfu, "top": rows},
                                   indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
