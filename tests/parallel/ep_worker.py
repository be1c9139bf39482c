"""One rank of tests/parallel/test_expert.py's exchange check (run under torchrun, gloo).

Every rank builds the same tiny Mixtral in float64, keeps an unsharded copy of one layer's
experts, and shards the model's experts with parallel.expert_parallel = world size. Each
rank then routes its own tokens as `--routing` says and runs the sharded experts module; the
outputs, the gradients of the inputs and routing weights, and the expert weights' gradients
(FSDP2's mean over ranks, made whole) must equal the unsharded module's on the same tokens.
Prints one line `ok <rank> <local experts> <rows its experts ran on>` per rank.
"""

import argparse
import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy

from moedpo.config import ModelConfig
from moedpo.models.load import build_models
from moedpo.parallel import expert


def routing(kind: str, rank: int, tokens: int, experts: int, top_k: int, gen):
    if kind == "uneven":  # every token of every rank on experts 0 and 1: the other ranks'
        index = torch.tensor([[0, 1]] * tokens)  # experts receive no token at all
        if rank == 1:
            index = torch.tensor([[1, 0]] * tokens)
    else:
        index = torch.stack([torch.randperm(experts, generator=gen)[:top_k]
                             for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64)
    return index, weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--routing", default="random")
    parser.add_argument("--implementation", default="dropless")
    parser.add_argument("--ep", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(config_path="tiny-mixtral.json", policy_dtype="float32",
                      reference_dtype="float32", moe_implementation=args.implementation,
                      capacity_factor=1.0 if args.implementation == "dropped" else 0.0)
    model, _ = build_models(cfg, seed=0, with_reference=False)
    model.double()
    plain = copy.deepcopy(model.model.layers[0].mlp.experts)
    total = plain.num_experts
    # float64 compute, gradients reduced in float32 as the trainer does (FSDP2 divides a
    # one-rank efsdp group's float64 or float16 gradients twice by the divide factor).
    reduce = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    expert.shard_experts(model, expert.expert_mesh("cpu", args.ep), {"mp_policy": reduce})
    sharded = model.model.layers[0].mlp.experts

    gen = torch.Generator().manual_seed(100 + rank)
    tokens, hidden_size, top_k = 12, plain.gate_up_proj.shape[-1], 2
    x = torch.randn(tokens, hidden_size, generator=gen, dtype=torch.float64)
    index, weights = routing(args.routing, rank, tokens, total, top_k, gen)
    probe = torch.randn(tokens, hidden_size, generator=gen, dtype=torch.float64)
    for module in (plain, sharded):  # one sequence of all the rank's tokens (capacity)
        module.moedpo_batch_shape = (1, tokens)
        module.moedpo_token_mask = None

    def run(module):
        xs, ws = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = module(xs, index, ws)
        (out * probe).sum().backward()
        return out.detach(), xs.grad, ws.grad

    received = []
    exchange = sharded.moedpo_exchange
    experts_forward = exchange.experts_forward

    def counted(rows, *rest):  # the rows this rank's experts run on
        received.append(rows.shape[0])
        return experts_forward(rows, *rest)

    exchange.experts_forward = counted
    want = run(plain)
    got = run(sharded)
    for name, a, b in zip(("output", "hidden grad", "weights grad"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    for name in ("gate_up_proj", "down_proj"):
        grad = getattr(plain, name).grad.clone()
        dist.all_reduce(grad)
        whole = getattr(sharded, name).grad.full_tensor()
        torch.testing.assert_close(whole, grad / world, rtol=1e-6, atol=1e-9, msg=name)
    local = sharded.gate_up_proj.to_local().shape[0] * world // args.ep  # FSDP2's over efsdp
    sys.stdout.write(f"ok {rank} {local} {received[0]}\n")  # one write: ranks share the pipe
    sys.stdout.flush()
    dist.barrier()  # leave together: a gloo peer gone mid-exchange aborts the other
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
