"""DPO training throughput: moedpo against TRL's DPOTrainer on the same model and data.

Each trainer runs in its own process (so peak RSS is its own), alternating moedpo, TRL,
moedpo, TRL, ... on the same model folder, the bundled demo pairs, batch, max_length,
optimizer (AdamW) and dtype (fp32), with the reference model live (no precompute). Reports the
median step time, pairs/s, real tokens/s, peak RSS, MFU of moedpo against a matmul peak
measured on the spot, and the ratios moedpo / TRL. Prints a Markdown table and writes JSON.

    pip install -e '.[bench]'                      # TRL, pinned
    python benchmarks/throughput.py                # tiny model (hidden 256, 4 layers, 8x top-2)
    python benchmarks/throughput.py --size small   # hidden 1024, 8 layers
    python benchmarks/throughput.py --variants moedpo moedpo+group+precompute trl
    python benchmarks/throughput.py --device cuda --dtype bfloat16 --size medium  # on a GPU

`--data long` trains on HH-like pairs with multi-turn prompts of 300-600 tokens and short
replies (max_length 1024) instead of the short demo pairs. `moedpo` is its defaults (the
shared prompt on: `data.share_prompt=auto`). Variants add or remove options: `+plain`
(data.share_prompt=false), `+nopack` (data.packing=false: one pair per row; the default packs
a micro-batch into one row where attention runs per pair), `+pack` (data.packing=true),
`+group` (data.group_by_length=true),
`+share` (data.share_prompt=true: the prompt runs once per pair; MFU counts the FLOPs of
the unshared work, so it reads as useful work per second) and `+precompute`
(reference.precompute=true: the one-time reference pass happens before step 0 and is not in
the step times; MFU then counts the policy's FLOPs only) and `+ckpt`
(model.activation_checkpointing=true: less memory, the policy's forward runs twice; MFU counts
the FLOPs without the recompute) and `+lora` (model.lora.r=16: PEFT adapters on attention
and experts, the reference the same model with adapters off; the table gives the trainable
share and each variant's ratios to plain `moedpo`, full fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4),
         "small": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=8),
         # ~1.3B active of 4.6B parameters: the GPU configuration of issue 6
         "medium": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP = 2
OPTIONS = {"group": ["data.group_by_length=true"], "precompute": ["reference.precompute=true"],
           "share": ["data.share_prompt=true"], "plain": ["data.share_prompt=false"],
           "pack": ["data.packing=true"], "nopack": ["data.packing=false"],
           "ckpt": ["model.activation_checkpointing=true"],
           "compile": ["model.compile=true"],
           "lora": ["model.lora.r=16", "model.lora.alpha=32"]}


def build_model(size: str, folder: Path, dtype: str = "float32") -> dict:
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from moedpo.models.load import EMBEDDED_TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    config = MixtralConfig(vocab_size=len(tokenizer), num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, **SIZES[size])
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    model.to(DTYPES[dtype]).save_pretrained(folder)  # initialised in float32, as HF does
    tokenizer.save_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"total_params": total, "active_params": total - experts * (1 - 2 / 8)}


def demo_pairs() -> list[dict]:
    from moedpo.data.sources import SkipLog, load_pairs

    pairs = load_pairs("demo", "train", {}, SkipLog())
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]


def long_pairs(n: int = 400, seed: int = 0) -> list[dict]:
    """HH-like pairs with long multi-turn prompts (300-600 tokens of the embedded tokenizer:
    earlier exchanges of the demo set before the last question) and short replies, as real
    HH prompts are; the shape where a DPO trainer spends its time."""
    import random

    from transformers import AutoTokenizer

    from moedpo.models.load import EMBEDDED_TOKENIZER

    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    rng, base = random.Random(seed), demo_pairs()
    out = []
    while len(out) < n:
        last = rng.choice(base)
        target, history = rng.randrange(300, 600), ""
        while len(tokenizer(history + last["prompt"])["input_ids"]) < target:
            turn = rng.choice(base)
            history += turn["prompt"] + turn["chosen"]
        out.append({**last, "prompt": history + last["prompt"]})
    return out


def write_pairs(folder: Path, pairs: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", pairs), ("test", pairs[:16])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def bench_pairs(args: argparse.Namespace) -> list[dict]:
    return long_pairs() if args.data == "long" else demo_pairs()


def run_moedpo(args: argparse.Namespace) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from moedpo.config import register_schema
    from moedpo.trainer import run

    register_schema()
    # Gone once read: a small-model run leaves a ~5 GB final checkpoint behind.
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"model.name_or_path={args.model_dir}", f"model.policy_dtype={args.dtype}",
                     f"model.reference_dtype={args.dtype}", f"parallel.backend={args.device}",
                     "use_synthetic_data=false", f"datasets=[{args.data_dir}]",
                     f"per_device_train_batch_size={args.batch}", f"max_length={args.max_length}",
                     f"max_prompt_length={args.max_length // 2}", "optimizer=AdamW", "lr=5e-4",
                     "sched.warmup_steps=0", f"max_steps={args.steps}", "report_metrics_freq=1",
                     "eval_frequency=1000000", "dry_run=true", "loggers=[]", f"output_dir={out}",
                     "resume=false"]
        overrides += [o for option in args.variant.split("+")[1:] for o in OPTIONS[option]]
        with initialize_config_module("moedpo.conf", version_base=None):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
        result = run(cfg)
        params = list(result.policy.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad) / sum(
            p.numel() for p in params)
        rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "train/examples_per_second" in r][WARMUP:]
        return {"trainable_share": trainable,
                "step_seconds": [args.batch / r["train/examples_per_second"] for r in rows],
                "tokens_per_step": [r["train/tokens_per_second"] * args.batch
                                    / r["train/examples_per_second"] for r in rows]}


def run_trl(args: argparse.Namespace) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # Weights in the benchmark's dtype, as moedpo holds them (bf16: pure bf16 training).
    dtype = DTYPES[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch,
                           max_length=args.max_length, learning_rate=5e-4, max_steps=args.steps,
                           logging_steps=1, report_to=[], use_cpu=args.device == "cpu",
                           bf16=args.dtype == "bfloat16",
                           save_strategy="no", precompute_ref_log_probs=False, beta=0.1,
                           lr_scheduler_type="constant", dataloader_num_workers=0, seed=0)
        data = datasets.Dataset.from_list(bench_pairs(args)[:args.batch * 10])
        trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=data,
                             processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    return {"step_seconds": times[WARMUP:]}


def worker(args: argparse.Namespace) -> None:
    result = run_moedpo(args) if args.variant.startswith("moedpo") else run_trl(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def matmul_peak(device: str, dtype: str) -> float:
    """Best of a square matmul in the benchmark's dtype: 2048 on a CPU, 8192 on a GPU."""
    n = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[dtype]) for _ in range(2))

    def matmul() -> None:
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
    matmul()
    best = min(_timed(matmul) for _ in range(5 if device == "cpu" else 20))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def launch(name: str, args: argparse.Namespace, model_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", name, "--model-dir", str(model_dir),
           "--steps", str(args.steps), "--batch", str(args.batch),
           "--max-length", str(args.max_length), "--device", args.device, "--dtype", args.dtype,
           "--data", args.data, "--data-dir", str(model_dir.parent / "data")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{name} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None,
                        help="default 256 for --data short, 1024 for --data long")
    parser.add_argument("--data", choices=["short", "long"], default="short",
                        help="short: the demo pairs (~60 tokens); long: HH-like multi-turn "
                        "prompts of 300-600 tokens, short replies")
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    parser.add_argument("--variants", nargs="+", default=["moedpo", "trl"],
                        help="trl, moedpo, or moedpo+OPTION[+OPTION] with OPTION in "
                        f"{', '.join(OPTIONS)}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_length = args.max_length or (1024 if args.data == "long" else 256)
    if args.worker:
        return worker(args)
    for name in args.variants:
        if name != "trl" and (not name.startswith("moedpo") or any(
                o not in OPTIONS for o in name.split("+")[1:])):
            parser.error(f"--variants: unknown {name}")

    with tempfile.TemporaryDirectory() as scratch:  # the model folder (GBs at --size medium)
        folder = Path(scratch) / "model"
        params = build_model(args.size, folder, args.dtype)
        write_pairs(Path(scratch) / "data", bench_pairs(args))
        runs = measure(args, folder)
    report(args, params, matmul_peak(args.device, args.dtype), runs)


def measure(args: argparse.Namespace, folder: Path) -> dict[str, list[dict]]:
    """Every variant `args.rounds` times, alternating, each in its own process."""
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for round_ in range(args.rounds):
        for name in runs:
            runs[name].append(launch(name, args, folder))
            print(f"round {round_ + 1}: {name} done", flush=True)
    return runs


def report(args: argparse.Namespace, params: dict, peak: float,
           runs: dict[str, list[dict]]) -> None:
    """Summary, ratios to TRL and MFU; a Markdown table printed and written, and JSON."""
    summary = {}
    for name, results in runs.items():
        steps = [s for r in results for s in r["step_seconds"]]
        median = statistics.median(steps)
        summary[name] = {"median_step_s": median, "pairs_per_s": args.batch / median,
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                         "trainable_share": results[0].get("trainable_share", 1.0)}
        if args.device == "cuda":
            summary[name]["peak_gpu_mb"] = max(r["peak_gpu_mb"] for r in results)
    for name in summary:
        # Real tokens per step; TRL trains on the same pairs as plain moedpo.
        source = name if name != "trl" else next((n for n in runs if n.startswith("moedpo")),
                                                  None)
        tokens = statistics.median(t for r in runs[source] for t in r["tokens_per_step"]) \
            if source else None
        if tokens is None:
            continue
        # policy fwd+bwd (6N per token) + reference fwd (2N) unless precomputed
        flops = (6 if "precompute" in name else 8) * params["active_params"] * tokens
        summary[name]["tokens_per_s"] = tokens / summary[name]["median_step_s"]
        summary[name]["mfu"] = flops / summary[name]["median_step_s"] / (peak * 1e9)
    # The memory that limits the run: the process's on a CPU, the GPU's on a GPU.
    memory, memory_label = (("peak_gpu_mb", "peak GPU memory") if args.device == "cuda"
                            else ("peak_rss_mb", "peak RSS"))
    ratio = {}
    for base in ("trl", "moedpo"):  # against TRL, and against moedpo's full fine-tuning
        if base not in summary:
            continue
        for name in summary:
            if name not in ("trl", base):
                ratio[f"{name} / {base}"] = {
                    "pairs_per_s": summary[name]["pairs_per_s"] / summary[base]["pairs_per_s"],
                    "peak_memory": summary[name][memory] / summary[base][memory]}
    lines = [f"{args.size} model ({params['total_params'] / 1e6:.1f}M parameters, "
             f"{params['active_params'] / 1e6:.1f}M active), {args.data} pairs, batch "
             f"{args.batch}, max_length "
             f"{args.max_length}, {args.dtype} on {args.device}, live reference; matmul peak "
             f"{peak:.0f} GFLOP/s",
             "", f"| trainer | step (s) | pairs/s | tokens/s | {memory_label} (MB) | MFU "
             "| trained |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['median_step_s']:.3f} | {s['pairs_per_s']:.1f} | "
                     f"{s.get('tokens_per_s', 0):.0f} | {s[memory]:.0f} | "
                     f"{100 * s.get('mfu', 0):.0f}% | {100 * s['trainable_share']:.1f}% |")
    lines.append("")
    for name, r in ratio.items():
        lines.append(f"{name}: pairs/s {r['pairs_per_s']:.2f}x, {memory_label} "
                     f"{r['peak_memory']:.2f}x  ")
    table = "\n".join(lines)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "data": args.data,
                                    "device": args.device, "dtype": args.dtype,
                                    "params": params, "peak_gflops": peak,
                                    "machine": platform.machine(), "torch": torch.__version__,
                                    "summary": summary, "ratio": ratio, "runs": runs}, indent=2))
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
