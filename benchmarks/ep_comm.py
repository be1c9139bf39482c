"""Bytes each device moves per optimizer step for the experts: FSDP2 alone against expert
parallelism (parallel.expert_parallel), from the model configs; then the all-to-all bytes of a
small gloo run on the CPU counted at the collective calls, against the same formula.

    python benchmarks/ep_comm.py                        # the table, and the 2-process CPU check
    python benchmarks/ep_comm.py --tokens-per-device 16384 --no-measure

The formula, per MoE layer and micro-batch, per device (the dense parts, attention,
embeddings, head, move the same bytes either way and are left out). E experts of
3 x H x I weights each, b_w bytes per weight in the compute dtype (2: bf16), T tokens per
device, top-k routing, b_a bytes per activation (2), D devices:

  FSDP2 alone: every device receives (D-1)/D of the whole expert stack W = E 3 H I b_w three
  times (the policy's forward, its backward after resharding, the reference's forward), and
  reduce-scatters the policy's expert gradients in float32 (each device sends (D-1)/D of
  W x 4/b_w):
      fsdp = 3 W (D-1)/D + 4/b_w W (D-1)/D
  EP over N ranks (efsdp = D/N copies): the same on its E/N experts over efsdp only, plus the
  token exchange. A slot leaves its rank with probability (N-1)/N under uniform routing; each
  step runs six exchanges of T k rows of H: the policy's dispatch and combine, their two
  backwards, the reference's dispatch and combine:
      ep = 3 (W/N) (efsdp-1)/efsdp + 4/b_w (W/N) (efsdp-1)/efsdp + 6 T k H b_a (N-1)/N

The measured check runs this script under torchrun (2 gloo processes, the embedded tiny
Mixtral, policy and reference sharded as a run shards them with parallel.expert_parallel=2),
counts the rows each all-to-all sends off-rank (forward at the call, backward through a hook
on its output) and compares them with the formula given the slots the routers actually sent
off-rank (counted from the routers' choices, not from the exchange) and with the uniform
expectation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

GB = 1e9
ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, layers: int | None) -> dict:
    fields = json.loads((ROOT / "moedpo" / "conf" / "models" / name).read_text())
    if layers:
        fields["num_hidden_layers"] = layers
    return fields


# Mixtral 8x7B: mixtral80.json is one of its 32 layers (the seed's single-layer config).
MODELS = {"Mixtral 8x7B": ("mixtral80.json", 32), "Mixtral 8x22B": ("mixtral822.json", None)}


def per_step_bytes(cfg: dict, devices: int, ep: int, tokens: int, weight_bytes: int = 2,
                   activation_bytes: int = 2) -> dict[str, float]:
    """Expert bytes moved per device per step (one micro-batch), FSDP2 alone and with EP."""
    experts, top_k = cfg["num_local_experts"], cfg["num_experts_per_tok"]
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    stack = experts * 3 * hidden * inter * weight_bytes  # W, one layer
    grad_scale = 4 / weight_bytes  # gradients reduced in float32

    def gathered(weights: float, group: int) -> float:
        return (3 + grad_scale) * weights * (group - 1) / group

    fsdp = gathered(stack, devices)
    efsdp = devices // ep
    exchange = 6 * tokens * top_k * hidden * activation_bytes * (ep - 1) / ep
    ep_total = gathered(stack / ep, efsdp) + exchange
    return {"fsdp": fsdp * layers, "ep": ep_total * layers, "exchange": exchange * layers,
            "expert_gather_ep": (ep_total - exchange) * layers}


def table(tokens: int, ep_width: int) -> tuple[list[dict], str]:
    rows = []
    for name, (file, layers) in MODELS.items():
        cfg = load_config(file, layers)
        for devices in (8, 64, 256):
            ep = min(ep_width, cfg["num_local_experts"], devices)
            b = per_step_bytes(cfg, devices, ep, tokens)
            rows.append({"model": name, "devices": devices, "ep": ep, "efsdp": devices // ep,
                         "fsdp_gb": b["fsdp"] / GB, "ep_gb": b["ep"] / GB,
                         "exchange_gb": b["exchange"] / GB,
                         "ratio": b["fsdp"] / b["ep"]})
    lines = [f"Expert bytes per device per optimizer step (one micro-batch of {tokens} tokens "
             "per device, bf16 weights and activations, float32 gradient reduction, policy "
             "forward + backward and reference forward)", "",
             "| model | devices | ep x efsdp | FSDP2 alone (GB) | EP (GB) | of which all-to-all "
             "(GB) | FSDP / EP |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['devices']} | {r['ep']} x {r['efsdp']} | "
                     f"{r['fsdp_gb']:.1f} | {r['ep_gb']:.1f} | {r['exchange_gb']:.1f} | "
                     f"{r['ratio']:.1f}x |")
    return rows, "\n".join(lines)


def worker() -> None:
    """One of the 2 processes of the measured check (see the module docstring)."""
    import torch
    import torch.distributed as dist
    import transformers.distributed.expert_parallel as hf_ep

    from moedpo.config import DPOConfig, ModelConfig
    from moedpo.models.load import build_models
    from moedpo.models.moe import experts_modules
    from moedpo.parallel import make_strategy
    from moedpo.parallel.backend import init_backend

    backend = init_backend("cpu")  # joins torchrun's gloo group
    rank, world = backend.rank, backend.world_size
    cfg = DPOConfig()
    cfg.model = ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                            reference_dtype="float32", activation_checkpointing=False)
    cfg.parallel.expert_parallel = world
    policy, reference = build_models(cfg.model, seed=0)
    hidden = policy.config.hidden_size
    experts_per_rank = policy.config.num_local_experts // world
    counts = {"sent_rows": 0, "slots_off": 0, "slots_in": 0, "tokens": 0, "layers": 0}
    exchange = hf_ep.all_to_all_single_autograd

    def counted(tensor, output_split_sizes, input_split_sizes, group):
        counts["sent_rows"] += sum(n for j, n in enumerate(input_split_sizes) if j != rank)
        out = exchange(tensor, output_split_sizes, input_split_sizes, group)
        if out.requires_grad:  # its backward sends the received rows' gradients back
            back = sum(n for j, n in enumerate(output_split_sizes) if j != rank)
            out.register_hook(lambda g: counts.__setitem__("sent_rows",
                                                           counts["sent_rows"] + back))
        return out

    hf_ep.all_to_all_single_autograd = counted

    def routed(module, args):  # the routers' choices, before any exchange
        owners = torch.bincount(args[1].reshape(-1) // experts_per_rank, minlength=world)
        every = [torch.zeros_like(owners) for _ in range(world)]
        dist.all_gather(every, owners)
        grad = torch.is_grad_enabled()
        times = 2 if grad else 1  # a forward with a backward sends as much again
        counts["slots_off"] += times * int(owners.sum() - owners[rank])
        counts["slots_in"] += times * int(sum(e[rank] for j, e in enumerate(every) if j != rank))
        if grad:
            counts["tokens"] += args[1].shape[0]
            counts["layers"] += 1

    for model in (policy, reference):
        for module in experts_modules(model):
            module.register_forward_pre_hook(routed)
    parallel = make_strategy(cfg, backend)  # expert parallel: FSDP2 with the experts apart
    policy = parallel.shard(policy, "policy")
    reference = parallel.shard(reference, "reference")
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, policy.config.vocab_size, (4, 64), generator=gen)
    policy(input_ids=ids).logits.float().pow(2).mean().backward()
    with torch.no_grad():
        reference(input_ids=ids)
    top_k = policy.config.num_experts_per_tok
    uniform = 6 * counts["tokens"] * top_k * (world - 1) / world
    result = {"rank": rank, "measured_rows": counts["sent_rows"],
              "formula_rows_actual_routing": counts["slots_off"] + counts["slots_in"],
              "formula_rows_uniform": uniform, "row_bytes": hidden * 4,
              "tokens_per_layer": counts["tokens"] // max(counts["layers"], 1),
              "layers": counts["layers"]}
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    dist.barrier()  # leave together: a gloo peer gone mid-exchange aborts the other
    dist.destroy_process_group()


def measure() -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", __file__, "--worker"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-5000:])
    return sorted((json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
                   if line.startswith("RESULT ")), key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-per-device", type=int, default=8192,
                        help="tokens per device per micro-batch (default: one pair of two "
                             "4096-token rows)")
    parser.add_argument("--ep-width", type=int, default=8,
                        help="EP group size: one node's GPUs (default 8)")
    parser.add_argument("--no-measure", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ep_comm.json")
    args = parser.parse_args()
    if args.worker:
        return worker()
    rows, text = table(args.tokens_per_device, args.ep_width)
    measured = [] if args.no_measure else measure()
    if measured:
        text += ("\n\nMeasured on 2 gloo processes (tiny Mixtral, EP 2, policy forward + "
                 "backward and reference forward of 4 x 64 tokens per rank), rows sent "
                 "off-rank by the all-to-alls:\n\n| rank | measured | formula, actual routing "
                 "| formula, uniform routing |\n| ---: | ---: | ---: | ---: |\n")
        text += "\n".join(f"| {m['rank']} | {m['measured_rows']} | "
                          f"{m['formula_rows_actual_routing']} | "
                          f"{m['formula_rows_uniform']:.0f} |" for m in measured)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens_per_device": args.tokens_per_device,
                                    "rows": rows, "measured": measured}, indent=2))
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
