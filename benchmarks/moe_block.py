"""Forward+backward time of one Mixtral MoE block per experts implementation.

Compares moedpo's `dropless`, `dense` and `dropped` (capacity factors 1.0/1.25/2.0) with
Hugging Face's default (`grouped_mm`) and `eager` on the same weights and inputs, counts the
expert FLOPs each one does, and reports achieved GFLOP/s against a matmul peak measured on the
spot. Prints a Markdown table and writes JSON.

    python benchmarks/moe_block.py                      # the full grid (several minutes on CPU)
    python benchmarks/moe_block.py --quick              # small shapes, seconds
    python benchmarks/moe_block.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moedpo.models.moe import apply_moe_implementation, capacity

SEQ_LEN = 512  # tokens per sequence: the dropped path's capacity is per sequence


class OneBlock(torch.nn.Module):
    """A one-block 'model' so that moedpo switches implementations as on a real model."""

    def __init__(self, block: MixtralSparseMoeBlock) -> None:
        super().__init__()
        self.block, self.config = block, block.experts.config

    def set_experts_implementation(self, name: str) -> None:
        self.config._experts_implementation = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peak(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of a square matmul: the hardware's own ceiling for this benchmark."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    sync(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def expert_flops(impl: str, tokens: int, hidden: int, inter: int, experts: int, top_k: int,
                 factor: float) -> float:
    """Expert matmul FLOPs of forward + backward (3x forward) for one block."""
    per_row = 2 * 3 * hidden * inter  # gate, up, down
    if impl == "dense":
        rows = tokens * experts
    elif impl == "dropped":
        rows = experts * (tokens // SEQ_LEN) * capacity(SEQ_LEN, top_k, experts, factor)
    else:
        rows = tokens * top_k
    return 3 * rows * per_row


def time_impl(model: OneBlock, x: torch.Tensor, reps: int) -> float:
    def step() -> None:
        xx = x.detach().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model(xx).float().sum().backward()

    step()
    sync(x.device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync(x.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_shape(tokens: int, hidden: int, experts: int, top_k: int, device: torch.device,
              dtype: torch.dtype, reps: int, peak: float, skip_dense_over: float) -> list[dict]:
    inter = 2 * hidden if experts <= 8 else hidden // 2  # Mixtral-like vs fine-grained experts
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter,
                           num_local_experts=experts, num_experts_per_tok=top_k)
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    block = block.to(device=device, dtype=dtype)
    x = torch.randn(tokens // SEQ_LEN, SEQ_LEN, hidden, device=device, dtype=dtype)
    variants = [("hf", "grouped_mm", 0.0), ("hf-eager", "eager", 0.0),
                ("dropless", None, 0.0), ("dense", None, 0.0)]
    variants += [(f"dropped cf={cf}", None, cf) for cf in (1.0, 1.25, 2.0)]
    rows = []
    for label, hf_name, factor in variants:
        impl = label.split()[0]
        flops = expert_flops(impl, tokens, hidden, inter, experts, top_k, factor)
        if impl == "dense" and flops / (peak * 1e9) > skip_dense_over:
            continue  # would take minutes: E/k times the routed FLOPs
        model = OneBlock(copy.deepcopy(block))
        if hf_name:
            model.set_experts_implementation(hf_name)
        else:
            apply_moe_implementation(model, impl, factor)
        seconds = time_impl(model, x, reps)
        rows.append({"tokens": tokens, "hidden": hidden, "intermediate": inter,
                     "experts": experts, "top_k": top_k, "impl": label,
                     "ms": seconds * 1e3, "expert_gflop": flops / 1e9,
                     "gflops": flops / seconds / 1e9,
                     "peak_fraction": flops / seconds / 1e9 / peak})
        print(f"  {tokens:>5} H{hidden:<5} E{experts:<3} k{top_k}  {label:<16} "
              f"{seconds * 1e3:9.1f} ms", flush=True)
    base = next(r["ms"] for r in rows if r["impl"] == "hf")
    dense = next((r["ms"] for r in rows if r["impl"] == "dense"), None)
    for r in rows:
        r["speedup_vs_hf"] = base / r["ms"]
        r["speedup_vs_dense"] = dense / r["ms"] if dense else None
    return rows


def markdown(rows: list[dict], peak: float) -> str:
    lines = [f"Matmul peak measured: {peak:.0f} GFLOP/s. Times: forward + backward of one block.",
             "", "| tokens | H | E | k | impl | ms | expert GFLOP | GFLOP/s | % peak | vs hf |",
             "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['hidden']} | {r['experts']} | {r['top_k']} | "
                     f"{r['impl']} | {r['ms']:.1f} | {r['expert_gflop']:.1f} | "
                     f"{r['gflops']:.0f} | {100 * r['peak_fraction']:.0f}% | "
                     f"{r['speedup_vs_hf']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tokens 1024, hidden 256 only")
    parser.add_argument("--skip-dense-over", type=float, default=30.0,
                        help="skip `dense` where its estimated time exceeds this many seconds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/moe_block.json"))
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    peak = measure_peak(device, dtype)
    print(f"matmul peak: {peak:.0f} GFLOP/s on {device} ({args.dtype})", flush=True)
    token_sizes, hidden_sizes = ([1024], [256]) if args.quick else ([2048, 8192], [512, 1024])
    rows = []
    for tokens in token_sizes:
        for hidden in hidden_sizes:
            for experts, top_k in ((8, 2), (64, 8)):
                rows += run_shape(tokens, hidden, experts, top_k, device, dtype, args.reps,
                                  peak, args.skip_dense_over)
    table = markdown(rows, peak)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": str(device), "dtype": args.dtype, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "peak_gflops": peak, "rows": rows}, indent=2))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
