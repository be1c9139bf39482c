"""Expert parallelism (parallel.expert_parallel) across CPU processes (torchrun, gloo): the
exchange equals the unsharded experts, and EP training equals one process."""

import re
import subprocess
import sys

import pytest
import torch
from test_fsdp import COMMON, kill_after_checkpoint_and_resume, single, torchrun

from conftest import ROOT, assert_same_run, compose_cfg, final_weights, run_ok
from moedpo.checkpoint import save_weights
from moedpo.config import ConfigError, ModelConfig
from moedpo.models.load import build_models
from moedpo.trainer import run
from moedpo.validate import validate


def exchange(*args: str) -> list[tuple[int, int]]:
    """(local experts, rows the rank's experts ran on) per rank of ep_worker.py."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "tests/parallel/ep_worker.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    found = sorted(tuple(map(int, m)) for m in re.findall(r"ok (\d+) (\d+) (\d+)\n",
                                                          done.stdout))
    assert [rank for rank, *_ in found] == [0, 1], done.stdout[-3000:] + done.stderr[-3000:]
    return [(local, rows) for _, local, rows in found]


@pytest.mark.parametrize("implementation", ["dropless", "dropped"])
def test_exchange_equals_the_unsharded_experts(implementation):
    """Each rank routes its own tokens; the sharded experts' outputs and the gradients of
    inputs and routing weights equal the unsharded module's (1e-12, float64), and the expert
    weights' gradients its mean over ranks. Each rank holds 4 of the 8 experts."""
    ranks = exchange("--routing", "random", "--implementation", implementation)
    assert [local for local, _ in ranks] == [4, 4]
    if implementation == "dropless":  # 2 ranks x 12 tokens x top-2, split by owner
        assert sum(rows for _, rows in ranks) == 48
    else:  # capacity 3 slots per expert and sequence: only kept slots travel
        assert sum(rows for _, rows in ranks) < 48


def test_exchange_with_uneven_routing_and_a_rank_without_tokens():
    """Every token of both ranks on experts 0 and 1 (rank 0's): rank 0's experts run all 48
    slots, rank 1's none (one empty row keeps its backward in the collective), and both
    ranks' results are still exact."""
    ranks = exchange("--routing", "uneven")
    assert ranks[0][1] == 48 and ranks[1][1] <= 1


# Packed shared-prompt rows, the chunked head, and the router loss with the expert shares
# pooled over ranks (global_batch: per-rank shares would train another model).
PACKED = ["data.static_shapes=false", "data.packing=true", "model.logps_chunk_size=16",
          "model.router_aux_loss_coef=0.1", "model.router_aux_loss_scope=global_batch"]


# dropless stays in the fast tier: the one 2-rank torchrun run there (FSDP2 over the
# non-expert weights, the all-to-all exchange of the experts).
@pytest.mark.parametrize("moe", [
    pytest.param([], id="dropless"),
    pytest.param(["model.capacity_factor=1.0"], id="dropped", marks=pytest.mark.slow),
    pytest.param(PACKED, id="packed_chunked_head_aux_loss", marks=pytest.mark.slow),
    pytest.param(["model.config_path=tiny-gpt-oss.json"], id="gpt_oss_transposed_biased_experts",
                 marks=pytest.mark.slow)])
def test_expert_parallel_on_two_ranks_equals_one_process(tmp_path, one_process, moe):
    one = one_process(*COMMON, *moe, "per_device_train_batch_size=4")  # FSDP2's baseline too
    run_ok(torchrun(*COMMON, *moe, "per_device_train_batch_size=2", f"output_dir={tmp_path}",
                    "exp_name=two", "parallel.expert_parallel=2"))
    total = 4 if "gpt-oss" in " ".join(moe) else 8  # tiny-gpt-oss.json has 4 experts
    log = (tmp_path / "two" / "train.log").read_text()
    assert f"{total // 2} of {total} experts per rank" in log
    assert_same_run(one, tmp_path / "two", atol=1e-5, rel=1e-5)


# Slow tier: 4 torchrun ranks; the 2-rank EP run (dropless, above) stays fast.
@pytest.mark.slow
def test_four_ranks_ep2_x_efsdp2_read_checkpoint_shards_and_equal_one_process(tmp_path):
    """4 processes: 2 EP groups (efsdp 2 x ep 2), so each expert has 2 copies, FSDP2-sharded
    between them (gradients summed over the copies, then divided by the 4 ranks). Weights
    from checkpoint_manager_path (each rank reads its expert shards), the reference offloaded
    to host memory: the same run as one process."""
    policy, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                         policy_dtype="float32"), seed=5)
    save_weights(policy, str(tmp_path / "weights"))
    # lr 1e-4: at the demo's 1e-3 the 4-way sums' rounding flipped one router near-tie in
    # an eval of step 3 (one token of 15571 in layer 3; plain FSDP2 on 4 ranks flips none
    # there by chance), which moves a reward by 2e-5.
    args = [*COMMON, "lr=1e-4", f"checkpoint_manager_path={tmp_path / 'weights'}",
            f"output_dir={tmp_path}"]
    run_ok(single(*args, "per_device_train_batch_size=4", "exp_name=one"))
    four = torchrun(*args, "per_device_train_batch_size=1", "exp_name=four",
                    "reference.cpu_offload=true", "parallel.expert_parallel=2")
    four[four.index("--nproc_per_node") + 1] = "4"
    run_ok(four)
    log = (tmp_path / "four" / "train.log").read_text()
    assert "(each process its shards)" in log and "(efsdp 2 x ep 2)" in log
    assert_same_run(tmp_path / "one", tmp_path / "four", atol=1e-5, rel=1e-5)


@pytest.mark.slow
def test_more_expert_copies_than_local_experts_shard_each_expert_and_equal_one_process(
        tmp_path):
    """2 experts, EP 2 on 4 ranks: one expert per rank and 2 copies of it, so FSDP2 cannot
    split the [1, ...] stack by expert; it is split along its largest dim (even_placement on
    the local shard; before, one copy held the whole expert and the other padding). Same
    run as one process."""
    args = [*COMMON, "lr=1e-4", "+model.config_overrides.num_local_experts=2",
            f"output_dir={tmp_path}"]
    run_ok(single(*args, "per_device_train_batch_size=4", "exp_name=one"))
    four = torchrun(*args, "per_device_train_batch_size=1", "exp_name=four",
                    "parallel.expert_parallel=2")
    four[four.index("--nproc_per_node") + 1] = "4"
    run_ok(four)
    assert "1 of 2 experts per rank" in (tmp_path / "four" / "train.log").read_text()
    assert_same_run(tmp_path / "one", tmp_path / "four", atol=1e-5, rel=1e-5)


# Slow tier: 2 torchrun ranks killed and resumed; in-process resume tests stay fast.
@pytest.mark.slow
def test_expert_parallel_kill_and_resume_equals_a_straight_run(tmp_path):
    """Killed after the checkpoint of step 4 and resumed with the same parallel.expert_parallel:
    the run ends as an unbroken one (DCP reads each rank's experts back)."""
    args = [*COMMON, "max_steps=6", "dry_run=false", "per_device_train_batch_size=4",
            "checkpoint.save_frequency=2", "parallel.expert_parallel=2",
            f"output_dir={tmp_path}"]
    run_ok(torchrun(*args, "exp_name=straight"))
    kill_after_checkpoint_and_resume(torchrun(*args, "exp_name=killed"), tmp_path, "killed", 4)
    assert_same_run(tmp_path / "straight", tmp_path / "killed", atol=1e-6)
    experts = {k: v for k, v in final_weights(tmp_path / "killed" / "checkpoints").items()
               if k.endswith("experts.gate_up_proj")}
    assert experts and all(v.shape[0] == 8 for v in experts.values())  # saved whole


def test_expert_parallel_needs_several_processes(make_cfg):
    cfg = make_cfg("+experiment=demo", "max_steps=1", "parallel.expert_parallel=2")
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 2"):
        run(cfg)


def load_comm_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ep_comm", ROOT / "benchmarks" / "ep_comm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_communication_model_counts_what_the_exchange_sends():
    """benchmarks/ep_comm.py: the FSDP2 side is the issue's hand figure (8x22B: 4.8 GB of
    expert weights per layer, gathered 3 times a step plus a float32 gradient reduction),
    and on a 2-process run the rows the all-to-alls send off-rank are exactly six
    exchanges of the slots the routers sent off-rank."""
    comm = load_comm_model()
    cfg = comm.load_config("mixtral822.json", 1)
    stack = 8 * 3 * 6144 * 16384 * 2
    assert stack / 1e9 == pytest.approx(4.83, abs=0.01)
    got = comm.per_step_bytes(cfg, devices=8, ep=8, tokens=8192)
    assert got["fsdp"] == pytest.approx((3 + 2) * stack * 7 / 8)
    assert got["ep"] == pytest.approx(6 * 8192 * 2 * 6144 * 2 * 7 / 8)  # efsdp 1: no gathers
    for rank in comm.measure():
        assert rank["measured_rows"] == rank["formula_rows_actual_routing"] > 0
        assert rank["measured_rows"] == pytest.approx(rank["formula_rows_uniform"], rel=0.2)


def test_spmd_expert_axis_splits_experts_by_id_and_the_rest_as_before():
    """The partition specs of an expert-parallel SPMD mesh: the stacked experts split E over
    "expert" (H still over "fsdp"), dense weights' "fsdp" dimension over ("fsdp", "expert");
    without the axis, the original table."""
    from types import SimpleNamespace

    import torch

    from moedpo.parallel.spmd import partition_spec

    ep_mesh = SimpleNamespace(axis_names=("fsdp", "expert", "tensor"))
    plain = SimpleNamespace(axis_names=("fsdp", "tensor"))
    gate_up, down = torch.empty(8, 32, 16), torch.empty(8, 16, 16)
    q_proj, unknown = torch.empty(16, 16), torch.empty(4, 40)
    name = "model.layers.0.mlp.experts."
    assert partition_spec(name + "gate_up_proj", gate_up, ep_mesh) == ("expert", "tensor", "fsdp")
    assert partition_spec(name + "down_proj", down, ep_mesh) == ("expert", "fsdp", "tensor")
    assert partition_spec("model.layers.0.self_attn.q_proj.weight", q_proj, ep_mesh) == \
        ("tensor", ("fsdp", "expert"))
    assert partition_spec("model.x.weight", unknown, ep_mesh) == (None, ("fsdp", "expert"))
    assert partition_spec("model.layers.0.mlp.gate.weight", q_proj, ep_mesh) is None
    assert partition_spec(name + "gate_up_proj", gate_up, plain) == (None, "tensor", "fsdp")
    assert partition_spec("model.layers.0.self_attn.q_proj.weight", q_proj, plain) == \
        ("tensor", "fsdp")


def test_expert_parallel_not_dividing_the_processes_is_refused_up_front(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    with pytest.raises(ConfigError, match="parallel.expert_parallel=3: must divide the 2 "
                                          "processes"):
        validate(compose_cfg("+experiment=demo", "parallel.expert_parallel=3"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    validate(compose_cfg("+experiment=demo", "parallel.expert_parallel=2"))


# Slow tier: 2 torchrun ranks; the EP refusals checked up front stay fast.
@pytest.mark.slow
def test_expert_parallel_over_dense_experts_is_refused_under_torchrun(tmp_path):
    done = subprocess.run(torchrun(*COMMON, f"output_dir={tmp_path}", "parallel.expert_parallel=2",
                                   "model.moe_implementation=dense"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "moe_implementation=dense: expert parallelism sends each token to its experts only" \
        in done.stderr, done.stderr[-3000:]


def test_models_expert_parallelism_cannot_split_are_refused(tiny_neox_dir):
    from moedpo.parallel.expert import check_expert_count

    mixtral, _ = build_models(ModelConfig(config_path="tiny-mixtral.json"), with_reference=False)
    check_expert_count(mixtral, 4)  # 8 experts: 2 per rank
    with pytest.raises(ConfigError, match="8 experts, which 3 ranks cannot hold"):
        check_expert_count(mixtral, 3)
    dense, _ = build_models(ModelConfig(name_or_path=str(tiny_neox_dir)), with_reference=False)
    with pytest.raises(ConfigError, match="has no experts"):
        check_expert_count(dense, 2)


# Slow tier: torchrun runs at two EP sizes; the 2-rank EP run stays fast.
@pytest.mark.slow
def test_a_checkpoint_resumes_with_another_expert_parallel_size(tmp_path):
    """DCP saves every expert shard with its global offsets, so a run checkpointed with
    EP 2 resumes as plain FSDP2 (EP 1) on the same ranks, optimizer state included, and ends
    with the weights of a straight EP 2 run."""
    args = [*COMMON, "checkpoint.save_frequency=2", f"output_dir={tmp_path}",
            "per_device_train_batch_size=2"]
    run_ok(torchrun(*args, "max_steps=4", "exp_name=straight", "parallel.expert_parallel=2"))
    run_ok(torchrun(*args, "max_steps=2", "exp_name=switch", "parallel.expert_parallel=2"))
    run_ok(torchrun(*args, "max_steps=4", "exp_name=switch", "parallel.expert_parallel=1"))
    log = (tmp_path / "switch" / "train.log").read_text()
    assert "parallel.expert_parallel: 2 -> 1" in log and "at step 2" in log
    a = final_weights(tmp_path / "straight" / "checkpoints")
    b = final_weights(tmp_path / "switch" / "checkpoints")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
