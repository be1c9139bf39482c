"""Train steps under torch_xla SPMD (4 virtual CPU devices): moedpo's static-shape MoE paths
against Hugging Face's eager experts, in the same run, same model, data and batch.

What it shows on a CPU is compilation behaviour, not TPU speed: a static path compiles its
step graph once and then only executes it; HF's eager experts size their matmuls by the
routing, so XLA compiles a new graph almost every step. Each implementation trains in its own
process (the torch_xla venv of scripts/xla_env.sh); reports median step time after warm-up
and XLA compilations per step, prints a Markdown table and writes JSON.

    python benchmarks/spmd.py                         # dense, dropped (cf 1.25), hf_eager
    python benchmarks/spmd.py --tp 2 --steps 8
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "moedpo/assets/data/demo"
IMPLEMENTATIONS = {"dense": ["model.moe_implementation=dense"],
                   "dropped": ["model.capacity_factor=1.25"],
                   "hf_eager": ["model.moe_implementation=hf_eager"]}
WARMUP = 2  # step 0 compiles without optimizer state, step 1 with it


def small_dataset(folder: Path, n_train: int, n_test: int) -> Path:
    """Demo pairs, few eval rows: the final eval is not what is measured."""
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with gzip.open(DEMO / f"{split}.jsonl.gz", "rt") as src, \
                gzip.open(folder / f"{split}.jsonl.gz", "wt") as dst:
            for _, line in zip(range(n), src, strict=False):
                dst.write(line)
    return folder


def run(name: str, args: argparse.Namespace, data: Path, out: Path) -> dict:
    global_batch = args.per_device * args.devices
    cmd = [args.python, "run_dpo_no_trainer.py", "+experiment=demo", f"datasets=[{data}]",
           f"max_steps={args.steps}", f"per_device_train_batch_size={args.per_device}",
           f"per_device_eval_batch_size={args.per_device}", f"max_length={args.max_length}",
           f"max_prompt_length={args.max_length // 2}", "do_first_eval=false",
           "eval_frequency=100000", "report_metrics_freq=1", "loggers=[]", "shuffle=false",
           f"tensor_parallelism={args.tp}", f"output_dir={out}", f"exp_name={name}",
           *IMPLEMENTATIONS[name]]
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(args.devices),
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    metrics = out / name / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.exists() else []
    rows = [r for r in rows if "train/examples_per_second" in r]
    seconds = [global_batch / r["train/examples_per_second"] for r in rows]
    compiles = [r["train/xla_compiles"] for r in rows]
    error = None
    if done.returncode:  # HF's eager experts can exhaust the XLA CPU JIT's code memory
        lines = [x for x in done.stderr.splitlines() if "error" in x.lower()]
        error = f"exit {done.returncode} after {len(rows)} steps: " + (
            lines[-1].strip() if lines else done.stderr.strip().splitlines()[-1])
        print(f"{name}: {error}", file=sys.stderr)
        if len(rows) <= WARMUP:
            return {"error": error, "steps_done": len(rows), "step_seconds": seconds,
                    "compiles": compiles, "wall_s": time.perf_counter() - started}
    per_step = [b - a for a, b in zip(compiles, compiles[1:], strict=False)]
    return {"step_seconds": seconds, "median_step_s": statistics.median(seconds[WARMUP:]),
            "compiles_total": compiles[-1], "compiles_per_step_after_warmup":
            statistics.mean(per_step[WARMUP - 1:]) if len(per_step) >= WARMUP else None,
            "final_loss": rows[-1]["train/loss"], "wall_s": time.perf_counter() - started,
            "steps_done": len(rows), "error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="the torch_xla venv's python (default: build or reuse "
                        "it with scripts/xla_env.sh)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--per-device", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=list(IMPLEMENTATIONS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/spmd.json")
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    if not args.python:
        args.python = subprocess.run(["bash", str(ROOT / "scripts/xla_env.sh")], check=True,
                                     capture_output=True, text=True).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = small_dataset(Path(tmp) / "data", n_train=args.steps * args.per_device
                             * args.devices, n_test=args.per_device * args.devices)
        for name in args.impl:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run(name, args, data, Path(tmp) / "runs")
    base = results.get("hf_eager")
    lines = [f"SPMD on {args.devices} virtual CPU devices, mesh ({args.devices // args.tp}, "
             f"{args.tp}), tiny Mixtral (4 layers, 8 experts top-2), global batch "
             f"{args.per_device * args.devices}, max_length {args.max_length}, fp32, "
             f"{args.steps} steps", "",
             "| MoE path | median step (s) | vs hf_eager | XLA compiles | compiles/step after "
             "warm-up | loss at last step |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        if "median_step_s" not in r:
            done = ", ".join(f"step {i}: {t:.1f} s" for i, t in enumerate(r["step_seconds"]))
            lines.append(f"| {name} | died after {r['steps_done']} step(s) ({done}) | - | "
                         f"{r['compiles'][-1] if r['compiles'] else '-'} | - | - |")
            continue
        ratio = (f"{base['median_step_s'] / r['median_step_s']:.1f}x"
                 if base and "median_step_s" in base else "-")
        lines.append(f"| {name} | {r['median_step_s']:.3f} | {ratio} | {r['compiles_total']} | "
                     f"{r['compiles_per_step_after_warmup']:.1f} | {r['final_loss']:.4f} |")
    lines += [f"\n{name}: {r['error']}" for name, r in results.items() if r.get("error")]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                    "machine": platform.platform(), "results": results},
                                   indent=2))
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
