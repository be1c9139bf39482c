"""Expert parallelism (EP) under torchrun: each rank holds E/N of every layer's experts and
the routed tokens travel to them (all-to-all) instead of every rank gathering every expert.

The ranks form two views of one world (transformers' layout, `distributed/utils.py`):

    dense  : (fsdp,)       attention, routers, dense MLPs, embeddings, head: FSDP2 over all
    experts: (efsdp, ep)   expert weights Shard(0) over `ep` (whole experts per rank), and
                           FSDP2 over `efsdp` = world / ep (the copies of each expert group)

The exchange is transformers' own (`distributed/expert_parallel.py`): its `AllToAllEP`
sorts each (token, expert) pair by owner rank, swaps the counts, then the rows
(`all_to_all_single_autograd`, uneven splits), runs the experts module's own forward on the
received rows with local expert ids (here moedpo's dropless implementation, through the
experts interface) and sends the results back to be weighted and summed per token. It
composes with moedpo's experts, FSDP2 and DCP, so moedpo writes no dispatch of its own; what
it adds is the capacity-factor variant (`DroppedAllToAll`: the sender keeps each sequence's
first `capacity` claims per expert, exactly as one process does, and sends only those) and
the gradient scaling below.

Gradients: an expert's weights see the tokens of every rank of its EP group through the
exchange's backward, and FSDP2 then reduces over its efsdp copies, so the sum covers every
rank's tokens once; dividing by the world size (not efsdp's) makes it the same mean over all
ranks that the dense parameters get.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..config import ConfigError, DPOConfig
from ..models.moe import capacity, claim_places, experts_modules, loads_assumed
from ..private_api import own_parameters, real_mesh_bookkeeping, swapped_parameters
from .backend import Backend
from .fsdp import FSDP2, even_placement


class ExpertParallel(FSDP2):
    """FSDP2 with the experts apart: each rank holds E/ep whole experts of every layer (the
    (efsdp, ep) mesh above), the rest sharded by FSDP2 over all ranks."""

    name = "fsdp2+ep"

    def __init__(self, cfg: DPOConfig, backend: Backend) -> None:
        super().__init__(cfg, backend)
        self._experts_mesh = expert_mesh(backend.device.type, cfg.parallel.expert_parallel,
                                         cfg.parallel.replicate)
        self._own_batch = _self_mesh(self._experts_mesh)

    @classmethod
    def applies(cls, kind: str, world: int, cfg: DPOConfig) -> bool:
        return super().applies(kind, world, cfg) and cfg.parallel.expert_parallel > 1

    @classmethod
    def refusals(cls, cfg: DPOConfig, kind: str, world: int) -> Iterator[str]:
        yield from super().refusals(cfg, kind, world)
        ep, replicate = cfg.parallel.expert_parallel, cfg.parallel.replicate
        if world % ep:
            yield (f"parallel.expert_parallel={ep}: must divide the {world} processes of the "
                   "run (torchrun --nproc_per_node x nodes)")
        elif world % (ep * replicate):
            yield (f"parallel.expert_parallel={ep} x parallel.replicate={replicate} must divide "
                   f"the {world} processes of the run: each of the {replicate} groups holds "
                   "whole expert groups")

    def describe(self, policy: nn.Module) -> list[str]:
        ep, world = self.cfg.parallel.expert_parallel, self.backend.world_size
        return super().describe(policy) + [expert_line(policy, world, ep, "rank",
                                                       self.cfg.parallel.replicate)]

    def reduce_gradients(self, model: nn.Module) -> None:
        """HSDP: each replica group's experts hold the gradient of its own ranks' tokens
        (FSDP2 reduced it over the group, divided by the world size); summed over the groups
        here, so every copy holds the mean over all ranks, as the dense weights do. By hand
        (one all-reduce of the local shards) rather than FSDP2's HSDP for the experts, whose
        reduction with a custom divide factor is not documented."""
        mesh = self._experts_mesh
        if "erep" not in mesh.mesh_dim_names:
            return
        group = mesh.get_group("erep")
        with torch.no_grad():
            for experts in experts_modules(model):
                for param in experts.parameters():
                    if param.grad is not None:
                        dist.all_reduce(param.grad.to_local(), group=group)

    def shard_first(self, model: nn.Module, fsdp_kwargs: dict) -> None:
        # The experts' own mesh, sharded by expert: not the dense weights' mesh or placement.
        own = {k: v for k, v in fsdp_kwargs.items() if k not in ("mesh", "shard_placement_fn")}
        shard_experts(model, self._experts_mesh, own, self._own_batch)


def expert_line(policy: nn.Module, devices: int, ep: int, unit: str, replicate: int = 1) -> str:
    """The startup line of expert parallelism over `devices` (ranks or XLA devices)."""
    total = experts_modules(policy)[0].down_proj.shape[0]
    mesh = f"efsdp {devices // ep} x ep {ep}"
    if replicate > 1:
        mesh = f"erep {replicate} x efsdp {devices // (ep * replicate)} x ep {ep}"
    return (f"expert parallel: experts on a ({mesh}) mesh, "
            f"{total // ep} of {total} experts per {unit} and layer, routed tokens exchanged "
            "all-to-all")


def expert_mesh(device_type: str, ep: int, replicate: int = 1) -> DeviceMesh:
    """The (efsdp, ep) mesh of the experts: consecutive ranks form one EP group (one node's
    GPUs keep the all-to-all on the node's links), efsdp strides across the groups. Under
    HSDP (`replicate` R > 1) it is (erep R, efsdp, ep): the experts shard over efsdp inside
    each of the R groups of consecutive ranks and are replicated across them, as the dense
    weights are (`ExpertParallel.reduce_gradients` sums their gradients over erep)."""
    world = dist.get_world_size()  # a multiple of ep x replicate: validate.check_placement
    shape, names = (world // ep, ep), ("efsdp", "ep")
    if replicate > 1:
        shape, names = (replicate, world // (replicate * ep), ep), ("erep", "efsdp", "ep")
    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def check_expert_count(model: nn.Module, ep: int) -> None:
    """An MoE model whose every experts module splits into `ep` equal whole shares."""
    if not experts_modules(model):
        raise ConfigError(f"parallel.expert_parallel={ep}: {type(model).__name__} has no "
                          "experts (a dense model); set parallel.expert_parallel=1")
    for experts in experts_modules(model):
        count = experts.num_experts
        if count % ep:
            raise ConfigError(f"parallel.expert_parallel={ep}: {type(experts).__name__} has "
                              f"{count} experts, which {ep} ranks cannot hold in equal whole "
                              "shares; use a divisor of the expert count")


def _dropped_all_to_all():
    """`DroppedAllToAll`, defined once transformers' distributed module is importable."""
    from transformers.distributed.expert_parallel import AllToAllEP

    class DroppedAllToAll(AllToAllEP):
        """The capacity-factor MoE under EP: slots beyond each sequence's capacity on their
        expert are dropped on the sender (the first claims in token order are kept, as in
        `moe.dropped_experts_forward`), only kept slots are exchanged, and a token that lost
        every slot passes its input through."""

        def __call__(self, hidden_states, top_k_index, top_k_weights):
            experts = self.module
            tokens, top_k = top_k_index.shape
            batch, seq_len = getattr(experts, "moedpo_batch_shape", None) or (1, tokens)
            num_experts = self.num_local_experts * self.ep_mesh.size()
            slots = capacity(seq_len, top_k, num_experts, experts.moedpo_capacity_factor,
                             getattr(experts, "moedpo_capacity_rounding", "floor"))
            with torch.no_grad():
                place = claim_places(top_k_index.view(batch, seq_len, top_k), num_experts,
                                     getattr(experts, "moedpo_token_mask", None))
                keep = ((place >= 0) & (place < slots)).view(tokens, top_k)
                slot_token, slot_rank = keep.nonzero(as_tuple=True)
            # Each kept slot travels as a row of its own (top-1): the exchange then moves
            # and computes kept slots only.
            out = super().__call__(hidden_states[slot_token],
                                   top_k_index[slot_token, slot_rank, None],
                                   top_k_weights[slot_token, slot_rank, None])
            combined = out.new_zeros(tokens * top_k, out.shape[-1])
            combined = combined.index_copy(0, slot_token * top_k + slot_rank, out)
            combined = combined.view(tokens, top_k, -1).sum(1)
            return torch.where(~keep.any(-1, keepdim=True), hidden_states, combined)

    return DroppedAllToAll


def shard_experts(model: nn.Module, mesh: DeviceMesh, fsdp_kwargs: dict,
                  own_batch: DeviceMesh | None = None) -> None:
    """Every experts module of `model`: its [E, ...] weights Shard(0) over `mesh["ep"]`
    (meta tensors stay meta), its forward the all-to-all exchange around its own, then
    fully_shard over `mesh["efsdp"]`. Call before the decoder layers are sharded (they skip
    what is managed already)."""
    from torch.distributed.fsdp import fully_shard
    from transformers.distributed.expert_parallel import AllToAllEP

    ep_mesh, efsdp_mesh = mesh["ep"], mesh["efsdp"]
    ep = ep_mesh.size()
    check_expert_count(model, ep)
    implementation = getattr(model, "moedpo_moe_implementation", None)
    if implementation not in ("dropless", "dropped"):
        raise ConfigError(f"parallel.expert_parallel={ep} with model.moe_implementation="
                          f"{implementation}: expert parallelism sends each token to its "
                          "experts only; use dropless, or dropped (model.capacity_factor > 0)")
    own_batch = own_batch or _self_mesh(ep_mesh)
    exchange = AllToAllEP
    if loads_assumed() is not None:  # planned on fake tensors (planner/): no routing to read
        exchange = PlannedExchange
    elif implementation == "dropped":  # dropped on the sender; the receiver runs what came
        exchange = _dropped_all_to_all()
        model.set_experts_implementation("moedpo_dropless")
    for experts in experts_modules(model):
        total = experts.num_experts
        for name, param in list(experts.named_parameters(recurse=False)):
            if param.shape[0] != total:
                raise ConfigError(f"parallel.expert_parallel: {type(experts).__name__}.{name} "
                                  f"is not stacked by expert ({tuple(param.shape)})")
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(sharded, param.requires_grad))
        experts.num_experts = total // ep  # what the exchange and the experts see
        _install(experts, exchange(experts, ep_mesh, own_batch))
        # more copies than local experts: shard along the largest dim (fsdp.even_placement)
        with real_mesh_bookkeeping():  # a plan on fake tensors (planner/); else no-op
            fully_shard(experts, mesh=efsdp_mesh, **fsdp_kwargs,
                        shard_placement_fn=partial(even_placement, efsdp_mesh.size()))
        experts.set_gradient_divide_factor(float(dist.get_world_size()))
        if efsdp_mesh.size() > 1:  # a divide factor other than the group size: sum, then divide
            experts.set_force_sum_reduction_for_comms(True)


class PlannedExchange:
    """The dropless exchange as the planner traces it (`moe.assumed_loads`): fake tensors
    hold no routing, so the split sizes come from the assumed loads, the same on every
    rank, and this rank (rank 0, the planner's) owns the busiest experts. The tensors and
    collectives are AllToAllEP's: the sorted send rows, one all-to-all there and one back in
    the forward (two more in the backward), the experts' forward on the received rows, the
    results weighted and summed per token."""

    def __init__(self, experts: nn.Module, ep_mesh: DeviceMesh, own_batch: DeviceMesh) -> None:
        self.ep_mesh, self.num_local_experts = ep_mesh, experts.num_experts

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        from torch.distributed._functional_collectives import (
            all_to_all_single_autograd,
            wait_tensor,
        )

        ep, local = self.ep_mesh.size(), self.num_local_experts
        tokens, top_k = top_k_index.shape
        loads = loads_assumed()(tokens * top_k, local * ep)
        send = [sum(loads[r * local:(r + 1) * local]) for r in range(ep)]
        receive = [send[self.ep_mesh.get_local_rank()]] * ep
        group = self.ep_mesh.get_group()
        order = torch.argsort(top_k_index.reshape(-1))
        rows = wait_tensor(all_to_all_single_autograd(
            hidden_states[order // top_k], receive, send, group))
        out = self.experts_forward(rows, top_k_index.new_zeros(sum(receive), 1),
                                   rows.new_ones(sum(receive), 1))
        back = wait_tensor(all_to_all_single_autograd(out, send, receive, group))
        ordered = torch.empty_like(back)
        ordered[order] = back
        return (ordered.view(tokens, top_k, -1) * top_k_weights.unsqueeze(-1)).sum(1)


def _install(experts: nn.Module, exchange) -> None:
    """The experts' forward becomes: (global ids) -> exchange -> the module's own forward on
    local weights and ids -> back. The weights are DTensors (FSDP2 unshards them over efsdp,
    never over ep); the experts implementations read them as local tensors."""
    exchange.module = experts
    exchange.experts_forward = experts.forward
    experts.moedpo_exchange = exchange

    def forward(hidden_states, top_k_index, top_k_weights):
        with _local_parameters(experts):
            return exchange(hidden_states, top_k_index, top_k_weights).to(hidden_states.dtype)

    experts.forward = forward


@contextlib.contextmanager
def _local_parameters(module: nn.Module):
    """`module`'s DTensor parameters as their local shards for the duration (autograd takes
    each gradient back to the DTensor), restored after."""
    shards = {n: p.to_local() for n, p in own_parameters(module).items()
              if isinstance(p, DTensor)}
    with swapped_parameters(module, shards):
        yield


def _self_mesh(like: DeviceMesh) -> DeviceMesh:
    """A one-rank mesh of this process: transformers' exchange takes the group of ranks that
    hold the same batch (its TP group), which under data parallelism is each rank alone
    (every rank joins the collective that creates the groups)."""
    world = dist.get_world_size()
    return init_device_mesh(like.device_type, (world, 1), mesh_dim_names=("rest", "self"))["self"]

