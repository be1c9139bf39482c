""""Will it fit": `moedpo plan` over the models and device counts users ask about, one
process per plan (each traces on fake tensors; nothing is downloaded or allocated).

    python benchmarks/will_it_fit.py                    # the table in README / docs/planning.md
    python benchmarks/will_it_fit.py --models mixtral822.json --devices 64 256
    python benchmarks/will_it_fit.py --hardware tpu-v5p --devices 64 128 256 --name v5p

Every plan: DPO (sigmoid) with a live bf16 reference, a bf16 policy with float32 masters and
AdamW (`--lora`: LoRA r=16 on attention, dense MLPs and the experts as well), one pair of
`--max-length` tokens per device, activation checkpointing as the sharded default; `--set
KEY=VALUE ...` adds overrides to every plan. Writes
benchmarks/results/will_it_fit[_NAME].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# mixtral80.json is one layer of Mixtral 8x7B; its 32 layers make the model.
MODELS = ("mixtral80.json:32", "mixtral822.json", "qwen3-30b-a3b.json", "deepseek-v3.json",
          "gpt-oss-120b.json")
LORA = ("model.lora.r=16",)
NAMES = {"mixtral80.json:32": "Mixtral 8x7B", "mixtral822.json": "Mixtral 8x22B",
         "qwen3-30b-a3b.json": "Qwen3-30B-A3B", "deepseek-v3.json": "DeepSeek-V3",
         "gpt-oss-120b.json": "gpt-oss-120b"}


def plan(model: str, devices: int, hardware: str, max_length: int, lora: bool,
         extra: tuple[str, ...] = ()) -> dict:
    path, _, layers = model.partition(":")
    depth = [f"+model.config_overrides.num_hidden_layers={layers}"] if layers else []
    overrides = ["model=mixtral", f"model.config_path={path}", *depth,
                 "model.tokenizer_name_or_path=moedpo/assets/tokenizer",
                 f"max_length={max_length}", "per_device_train_batch_size=1",
                 *(LORA if lora else ()), *extra]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moedpo", "plan", *overrides, "--devices",
                           str(devices), "--hardware", hardware, "--json"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        return {"model": model, "devices": devices, "hardware": hardware, "lora": lora,
                "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(done.stdout)
    out.update(model=model, lora=lora, plan_seconds=time.perf_counter() - start)
    return out


def row(r: dict) -> str:
    name = NAMES.get(r["model"], r["model"]) + (" LoRA" if r["lora"] else "")
    if "error" in r:
        return f"| {name} | {r['devices']} x {r['hardware']} | error: {r['error']} |" + " |" * 6
    gib = 2**30
    return (f"| {name} | {r['devices']} x {r['hardware']} | {'yes' if r['fits'] else 'no'} | "
            f"{r['peak_bytes_per_device'] / gib:.1f} | {r['state_bytes_per_device'] / gib:.1f} | "
            f"{r['step_seconds']:.3g} | {r['pairs_per_second']:.3g} | {r['mfu']:.1%} | "
            f"{r['plan_seconds']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--devices", nargs="+", type=int, default=[8, 64, 256])
    parser.add_argument("--hardware", default="h100-80gb")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--lora", action="store_true", help="plan LoRA runs as well")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides added to every plan")
    parser.add_argument("--name", default="", help="suffix of the result files")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    header = ["| model | devices | fits | peak GiB/device | weights+grads+optimizer+reference "
              "GiB/device | step s | pairs/s | MFU | time to plan |",
              "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    results = []
    for model in args.models:
        for lora in (False, True) if args.lora else (False,):
            for devices in args.devices:
                results.append(plan(model, devices, args.hardware, args.max_length, lora,
                                    tuple(args.set)))
                print(row(results[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "will_it_fit" + (f"_{args.name}" if args.name else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"{stem}.md").write_text("\n".join([*header, *map(row, results)]) + "\n")


if __name__ == "__main__":
    main()
