"""Peak host memory of loading policy + reference under FSDP2, with and without meta init.

Runs `torchrun --nproc_per_node N` on this file for each way of loading the "small" Mixtral of
benchmarks/throughput.py (hidden 1024, 8 layers, 8 experts; 429M parameters, 1.7 GB in
float32), and reports each rank's peak RSS above its RSS before loading, and the load time:

- `whole`: `model.meta_init=false`: every rank loads the pretrained folder whole (policy and
  reference), then shards;
- `meta+rank0`: meta init, rank 0 loads the folder once and sends each rank its shards;
- `meta+checkpoint`: meta init, every rank reads only its shards of a DCP checkpoint
  (`checkpoint_manager_path`, written here by `moedpo convert`).

    python benchmarks/loading.py                  # 2 ranks, writes benchmarks/results/loading.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import build_model  # noqa: E402

WAYS = {"whole": ["model.meta_init=false"], "meta+rank0": ["model.meta_init=true"],
        "meta+checkpoint": ["model.meta_init=true", "checkpoint_manager_path={checkpoint}"]}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from moedpo.config import register_schema
    from moedpo.parallel import make_strategy
    from moedpo.parallel.backend import init_backend, shutdown
    from moedpo.placement import load_models

    register_schema()
    overrides = [f"model.name_or_path={args.model_dir}", "model.policy_dtype=float32",
                 "model.reference_dtype=float32",
                 *[o.format(checkpoint=args.checkpoint) for o in WAYS[args.way]]]
    with initialize_config_module("moedpo.conf", version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    backend = init_backend("cpu")
    before = rss_mb()
    started = time.perf_counter()
    _, policy, reference = load_models(cfg, make_strategy(cfg, backend))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"rank": backend.rank, "peak_above_start_mb": peak - before,
                                  "load_seconds": seconds}), flush=True)
    shutdown(backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loading.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--way", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as scratch:  # two small models' files, GBs
        tmp = Path(scratch)
        params = build_model("small", tmp / "model")
        checkpoint = tmp / "weights"
        subprocess.run([sys.executable, "-m", "moedpo.cli", "convert", str(tmp / "model"),
                        str(checkpoint)], check=True, capture_output=True)
        weights_mb = params["total_params"] * 4 / 2**20
        rows = {}
        for way in WAYS:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(args.ranks), __file__, "--worker", "--way", way,
                   "--model-dir", str(tmp / "model"), "--checkpoint", str(checkpoint)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            results = [json.loads(x.removeprefix("RESULT ")) for x in done.stdout.splitlines()
                       if x.startswith("RESULT ")]
            if done.returncode != 0 or len(results) != args.ranks:
                raise RuntimeError(f"{way} failed:\n{done.stderr[-3000:]}")
            rows[way] = sorted(results, key=lambda r: r["rank"])
            print(f"{way} done", flush=True)

    lines = [f"Loading policy + reference, small Mixtral ({params['total_params'] / 1e6:.0f}M "
             f"params, {weights_mb:.0f} MB per model in float32), {args.ranks} CPU ranks",
             "", "| way | " + " | ".join(f"rank {r} peak RSS above start (MB)"
                                        for r in range(args.ranks)) + " | load s (rank 0) |",
             "| --- |" + " --- |" * (args.ranks + 1)]
    for way, results in rows.items():
        lines.append(f"| {way} | " + " | ".join(f"{r['peak_above_start_mb']:.0f}"
                                                for r in results)
                     + f" | {results[0]['load_seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"params": params, "ranks": args.ranks, "results": rows},
                                   indent=2))
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
