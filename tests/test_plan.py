"""`moedpo plan`: the traced step on fake tensors against the same step on real tensors
(torch's own MemTracker and FLOP counter where they apply), the pieces of its models worked
by hand, and the command line."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import ROOT, compose_cfg, tiny_train_overrides, write_tiny_deepseek
from moedpo.models.load import ModelLoadError, initial_model, model_config
from moedpo.parallel.fsdp import even_placement
from moedpo.planner import collective_bytes
from moedpo.planner import trace as trace_lib
from moedpo.planner.cost import Costs, OpCosts
from moedpo.planner.hardware import HARDWARE, hardware
from moedpo.planner.memory import StorageTracker
from moedpo.planner.trace import balanced_loads

# A step big enough that activations dominate (several MB), small enough for seconds.
STEP = ("model=tiny", "max_length=256", "per_device_train_batch_size=2")


def test_balanced_loads_split_every_slot():
    assert balanced_loads()(12, 4) == [3, 3, 3, 3]
    assert balanced_loads()(10, 4) == [3, 3, 2, 2]  # the first experts take the remainder
    assert balanced_loads(1.0)(12, 4) == [6, 2, 2, 2]  # the busiest twice its share
    assert balanced_loads(100.0)(12, 4) == [12, 0, 0, 0]


def test_op_costs_count_matmul_flops_and_bytes_by_hand():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with OpCosts() as costs:
        a @ b
        a.view(32)  # a view moves nothing
    assert costs.ops == [(2 * 4 * 8 * 3, 4 * (32 + 24 + 12), False)]
    hw = HARDWARE["h100-80gb"]
    assert costs.recorded.seconds(hw) == hw.op_overhead  # a GPU waits for its launch


def test_an_operations_time_by_hand():
    gpu = replace(HARDWARE["h100-80gb"], op_overhead=1e-6)
    big = 2 * 8192**3  # an 8192-square bf16 matmul: compute-bound at 60% of the peak
    assert gpu.op_seconds(big, 3 * 8192**2 * 2, True) == pytest.approx(big / (989e12 * 0.6))
    assert gpu.op_seconds(10, 4e9, False) == pytest.approx(4e9 / 3.35e12)  # memory-bound
    assert gpu.op_seconds(10, 40, False) == 1e-6  # launch-bound: overlapped, not added
    cpu = replace(gpu, kind="cpu")
    assert cpu.op_seconds(10, 4e9, False) == pytest.approx(4e9 / 3.35e12 + 1e-6)  # added


def test_a_hardware_entry_from_a_file(tmp_path):
    entry = tmp_path / "my-gpu.yaml"
    entry.write_text("memory: 24e9\nbf16_flops: 1.65e14\nfp32_flops: 8.3e13\n"
                     "memory_bandwidth: 1.0e12\nfast_link: 3.2e10\nslow_link: 1.25e10\n"
                     "devices_per_node: 4\nefficiency: 0.5\n")
    hw = hardware(str(entry))
    assert (hw.name, hw.memory, hw.kind, hw.efficiency) == ("my-gpu", 24e9, "cuda", 0.5)
    assert hw.op_overhead == HARDWARE["h100-80gb"].op_overhead  # the default
    entry.write_text(entry.read_text() + "memroy: 3\n")
    with pytest.raises(ValueError, match="my-gpu.yaml: unknown field 'memroy'"):
        hardware(str(entry))
    entry.write_text("memory: lots\n")
    with pytest.raises(ValueError, match="my-gpu.yaml: memory: 'lots' is not a number"):
        hardware(str(entry))
    entry.write_text("memory: 1\n")
    with pytest.raises(ValueError, match="my-gpu.yaml: missing bf16_flops, fp32_flops"):
        hardware(str(entry))
    with pytest.raises(ValueError, match="h900: unknown; choose one of h100-80gb"):
        hardware("h900")


def test_storage_tracker_counts_views_once_and_frees():
    with StorageTracker() as tracker:
        x = torch.empty(1000)  # 4000 bytes
        y = x[10:]  # a view: no new bytes
        assert tracker.current == 4000
        z = torch.empty(500)
        assert tracker.current == 6000
        del x, y, z
        assert tracker.current == 0
    assert tracker.peak == 6000


def traced(tmp_path, mode: str, *args: str, ranks: int = 1) -> dict:
    """plan_worker.py's figures, in a process of its own (see its docstring)."""
    out = tmp_path / f"{mode}-{len(list(tmp_path.iterdir()))}.json"
    launch = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(ranks)]
    subprocess.run([*launch, "tests/parallel/plan_worker.py", mode, str(out), *args],
                   cwd=ROOT, check=True, timeout=600)
    return json.loads(out.read_text())


@pytest.mark.parametrize("lora", [[], ["model.lora.r=8"]], ids=["full", "lora"])
def test_the_planned_step_equals_the_real_step_in_one_process(tmp_path, lora):
    """Fake tensors and balanced routing against real weights and routing: the state
    exactly, the peak within 10%, the FLOPs exactly (dropless computes each slot once)."""
    planned = traced(tmp_path, "fake", "1", *STEP, *lora)
    real = traced(tmp_path, "real", *STEP, *lora)
    for part in ("parameters", "gradients", "optimizer", "reference", "flops"):
        assert planned[part] == real[part], part
    assert planned["peak"] == pytest.approx(real["peak"], rel=0.10)
    assert planned["transient"] > planned["state"] / 4  # activations traced, not skipped


def test_the_storage_tracker_agrees_with_torchs_memtracker(tmp_path):
    """The same real step measured by torch's MemTracker, where it applies (no frozen
    reference: SimPO), and by the planner's tracker: the same peak."""
    ours = traced(tmp_path, "real", *STEP, "loss.name=simpo")
    theirs = traced(tmp_path, "memtracker", *STEP, "loss.name=simpo")
    assert ours["peak"] == pytest.approx(theirs["peak"], rel=0.02)


def test_the_traced_flops_equal_torchs_flop_counter(tmp_path):
    counted = traced(tmp_path, "flops", *STEP)
    assert counted["flops"] == counted["torch_flops"] > 0


def test_fsdp2_shards_a_short_expert_stack_along_its_largest_dim():
    experts = torch.nn.Parameter(torch.empty(8, 64, 16))
    assert even_placement(4, experts).dim == 0  # 8 experts over 4 ranks: by expert
    assert even_placement(16, experts).dim == 1  # over 16 ranks: along the 64 rows
    assert even_placement(16, torch.nn.Parameter(torch.empty(8))).dim == 0


def test_a_plan_over_eight_fake_ranks_holds_an_eighth_of_the_state(tmp_path):
    one, eight = traced(tmp_path, "fake", "1", *STEP), traced(tmp_path, "fake", "8", *STEP)
    for part in ("parameters", "gradients", "optimizer"):
        assert one[part] / 8 <= eight[part] <= one[part] / 8 * 1.05, part  # FSDP2 pads


def test_expert_parallel_over_more_ranks_than_experts_holds_its_share(tmp_path):
    """EP 8 on 16 fake ranks: each rank holds one expert of every layer with one other copy;
    FSDP2 splits it between them, so the state is a 16th, as without EP."""
    plain = traced(tmp_path, "fake", "16", *STEP)
    ep = traced(tmp_path, "fake", "16", *STEP, "parallel.expert_parallel=8")
    assert ep["state"] == pytest.approx(plain["state"], rel=0.02)


@pytest.mark.parametrize("ranks", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_a_deep_model_planned_from_two_shallow_copies_equals_its_whole_trace(tmp_path, ranks):
    """10 layers traced at 4 and 6 and extrapolated: every figure as the whole trace's."""
    deep = (*STEP, "+model.config_overrides.num_hidden_layers=10")
    whole = traced(tmp_path, "whole", str(ranks), *deep)
    shallow = traced(tmp_path, "fake", str(ranks), *deep)
    assert shallow == pytest.approx(whole, rel=1e-6)
    assert trace_lib.traced_depths(compose_cfg(*deep)) == ((4, 6), 10)
    assert trace_lib.traced_depths(compose_cfg(*STEP)) is None  # 4 layers: traced whole


def test_shallow_copies_keep_deepseeks_dense_layers_and_per_layer_types(tmp_path):
    cfg = compose_cfg("model.config_path=gpt-oss-120b.json")
    ((a, b), full) = trace_lib.traced_depths(cfg)
    assert (a, b, full) == (4, 6, 36)
    config = model_config(trace_lib.with_depth(cfg, a).model)
    assert config.num_hidden_layers == 4
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    deepseek = compose_cfg(f"model.config_path={write_tiny_deepseek(tmp_path / 'ds.json')}",
                           "+model.config_overrides.first_k_dense_replace=1",
                           "+model.config_overrides.num_hidden_layers=12")
    assert trace_lib.traced_depths(deepseek) == ((5, 7), 12)  # one dense layer, then MoE


@pytest.mark.parametrize("name, billions", [
    ("mixtral80.json", 46.7), ("mixtral822.json", 140.6), ("qwen3-30b-a3b.json", 30.5),
    ("gpt-oss-120b.json", 116.8), ("deepseek-v3.json", 671.0)])
def test_shipped_model_configs_have_their_published_sizes(name, billions):
    """The configs the planner's table plans, built weightless: the parameter counts their
    model cards publish (mixtral80.json is one layer of Mixtral 8x7B: 32 make the model)."""
    depth = ["+model.config_overrides.num_hidden_layers=32"] if name == "mixtral80.json" else []
    model = initial_model(compose_cfg(f"model.config_path={name}", *depth).model, on_meta=True)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.1)


def test_model_config_overrides_set_fields_or_name_the_wrong_one():
    cfg = compose_cfg("model=tiny", "+model.config_overrides.num_hidden_layers=2")
    assert model_config(cfg.model).num_hidden_layers == 2
    cfg.model.config_overrides = {"num_hidden_layer": 2}
    with pytest.raises(ModelLoadError, match="config_overrides.num_hidden_layer: MixtralConfig"):
        model_config(cfg.model)


def test_collective_bytes_by_hand():
    cfg = compose_cfg(*STEP, "parallel.replicate=2")
    traced = trace_lib.TracedStep("fsdp2", parameters=0, gradients=500, optimizer=0,
                                  reference=100, peak=0, costs=[(1.0, Costs())], tokens=0,
                                  pairs=1, micro_batches=3, traced=2, parameter_count=1000,
                                  trainable_count=1000, expert_count=800)
    hw = HARDWARE["h100-80gb"]  # 8 per node: 16 devices = 2 groups of 8, one per node
    links = collective_bytes(cfg, traced, 16, hw)
    # the tiny config's float32 policy gathered twice and its float32 reference once, the
    # float32 gradients reduce-scattered: 3 micro-batches
    within = 7 / 8 * 1000 * (4 + 4 + 4 + 4) * 3
    assert links["fast"] == pytest.approx(within)
    assert links["slow"] == pytest.approx(2 * 1 / 2 * 500 * 3)  # HSDP's all-reduce
    # EP 4 within each group of 8: the 800 expert parameters split 4 ways, each part
    # gathered over its 2 copies; 2 micro-batches' traced all-to-alls of 1000 bytes
    cfg = compose_cfg(*STEP, "parallel.replicate=2", "parallel.expert_parallel=4")
    traced.costs = [(1.0, Costs(exchanged=1000))]
    ep = collective_bytes(cfg, traced, 16, hw)
    assert ep["fast"] == pytest.approx(
        (7 / 8 * 200 + 1 / 2 * 800 / 4) * 16 * 3 + 3 / 4 * 1000 * 3 / 2)
    assert ep["slow"] == links["slow"]


def test_expert_parallel_plan_exchanges_each_routed_row_and_computes_its_share(tmp_path):
    """EP 2 on 2 fake ranks: the all-to-alls the trace counted are the routed rows by hand
    (each MoE layer sends its rows out and back in the forward, again in its recomputation
    under checkpointing, in the backward, and in the reference's forward), and under
    balanced loads each rank computes the expert rows it would without EP."""
    ep = traced(tmp_path, "fake", "2", *STEP, "parallel.expert_parallel=2")
    plain = traced(tmp_path, "fake", "2", *STEP)
    config = model_config(compose_cfg(*STEP).model)
    rows = ep["tokens"] * config.num_experts_per_tok
    # rank 0 holds experts 0-3, which balanced loads give the remainder: it gets back more
    received = 2 * sum(balanced_loads()(rows, config.num_local_experts)[:4])
    assert received > rows
    passes = 4  # the forward, its recomputation, the backward, the reference's forward
    assert ep["exchanged"] == ((rows + received) * config.hidden_size * 4 * passes
                               * config.num_hidden_layers)
    assert plain["exchanged"] == 0
    assert ep["flops"] == pytest.approx(plain["flops"], rel=0.01)


def test_plan_command_prints_json():
    done = subprocess.run([sys.executable, "-m", "moedpo", "plan", *STEP, "--devices", "2",
                           "--hardware", "a100-80gb", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=True)
    out = json.loads(done.stdout)
    assert out["fits"] is True and out["strategy"] == "fsdp2" and out["hardware"] == "a100-80gb"
    assert out["state_bytes_per_device"] < out["peak_bytes_per_device"]
    assert out["step_seconds"] > 0 and 0 < out["mfu"] < 1
    assert out["collective_seconds"] > 0


def test_plan_command_refuses_what_it_cannot_plan():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "moedpo", "plan", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    bad = run("model=tiny", "--hardware", "h900")
    assert bad.returncode == 2 and "--hardware: h900: unknown; choose one of" in bad.stderr
    ep = run("model=tiny", "parallel.expert_parallel=2", "model.capacity_factor=1.25",
             "--devices", "2")
    assert ep.returncode == 2 and "the dropped MoE (model.capacity_factor > 0) is not" in \
        ep.stderr


@pytest.mark.slow
def test_the_planned_step_time_on_this_cpu_is_within_30_percent_of_the_real_step(tmp_path):
    """The `cpu` entry, timed in the same process just before, plans the small Mixtral's
    step (~400M parameters, 8 layers: matmul-bound); the same step on real tensors takes
    that long within 30%."""
    small = ("model=tiny", "max_length=256", "per_device_train_batch_size=2",
             *(f"+model.config_overrides.{k}={v}" for k, v in dict(
                 hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=64).items()))
    timed = traced(tmp_path, "time", *small)
    assert timed["planned_seconds"] == pytest.approx(timed["measured_seconds"], rel=0.30)


@pytest.mark.slow
@pytest.mark.parametrize("ep, lora, dtype", [(1, 0, "float32"), (2, 0, "float32"),
                                             (1, 8, "float32"), (1, 8, "bfloat16")],
                         ids=["fsdp2", "ep", "lora", "lora_bf16"])
def test_the_planned_state_equals_the_real_shards_on_two_ranks(tmp_path, ep, lora, dtype):
    """Two gloo ranks measure the real step, with and without expert parallelism, and with
    LoRA (float32, and a bf16 policy with float32 adapter masters); the plan over two fake
    ranks holds the same bytes of weights, gradients, optimizer state and reference, and
    peaks within 10% (EP: the real routing sends rank 0 other loads)."""
    step = (*STEP, f"parallel.expert_parallel={ep}", f"model.lora.r={lora}",
            f"model.policy_dtype={dtype}", f"model.reference_dtype={dtype}")
    real = traced(tmp_path, "real", *step, ranks=2)
    planned = traced(tmp_path, "fake", "2", *step)
    for part in ("parameters", "gradients", "optimizer", "reference"):
        assert planned[part] == real[part], part
    if ep == 1:  # dropless computes each slot once, on its token's rank
        assert planned["flops"] == real["flops"]
    assert planned["peak"] == pytest.approx(real["peak"], rel=0.10)


def test_search_axes():
    from moedpo.planner.search import expert_parallel_degrees, micro_batch_sizes, replica_counts

    assert micro_batch_sizes(8) == [1, 2, 4, 8] and micro_batch_sizes(12) == [1, 2, 4, 12]
    assert micro_batch_sizes(1) == [1]
    h100 = HARDWARE["h100-80gb"]  # 8 GPUs per node: shard groups of 8, 16, 32
    assert replica_counts(64, h100) == [1, 8, 4, 2]
    assert replica_counts(12, h100) == [1]  # no whole-node groups
    assert replica_counts(8, h100) == [1]
    assert replica_counts(256, HARDWARE["tpu-v5p"]) == [1]  # one flat SPMD mesh
    tiny = compose_cfg("model=tiny")  # 8 experts
    assert expert_parallel_degrees(tiny, 16, 1, h100) == [1, 8]  # at most a node
    assert expert_parallel_degrees(tiny, 12, 1, h100) == [1, 4]  # divides 12 and 8
    assert expert_parallel_degrees(tiny, 16, 1, HARDWARE["tpu-v5p"]) == [1]
    dropped = compose_cfg("model=tiny", "model.capacity_factor=1.25")
    assert expert_parallel_degrees(dropped, 16, 1, h100) == [1]  # not planned yet
    dense = compose_cfg("model=tiny", "+model.config_overrides.num_local_experts=1")
    assert expert_parallel_degrees(dense, 16, 1, h100) == [1]


def fake_trace(cfg, world, skew):
    """A step whose activations grow with the micro-batch (half of them checkpointed); its
    1B parameters' gathers, every micro-batch, outlast its compute: bigger micro-batches
    (fewer of them) are faster, checkpointing or not."""
    size, ckpt = cfg.per_device_train_batch_size, cfg.model.activation_checkpointing
    shard = world // cfg.parallel.replicate
    traced = min(cfg.gradient_accumulation_steps, 2)
    per_micro = [(size * 1e12 * (4 / 3 if ckpt else 1), 0, True), (0, 0, True)]
    state = 40 * 2**30 // shard
    return trace_lib.TracedStep(
        "fsdp2", parameters=state, gradients=0, optimizer=0, reference=0,
        peak=state + int(size * 2**30 * (0.5 if ckpt else 1)), tokens=0,
        costs=[(1.0, Costs(per_micro * traced))], pairs=8, micro_batches=8 // size,
        traced=traced, parameter_count=10**9, trainable_count=10**9)


def test_search_climbs_micro_batches_until_one_does_not_fit():
    """Without checkpointing sizes 1 and 2 fit in 8.55 GiB, 4 does not (the series stops);
    with it, the search starts at 4 and stops at 8. Ranked by pairs/s, fitting first."""
    import concurrent.futures

    from moedpo.planner.search import search

    hw = replace(HARDWARE["h100-80gb"], memory=9.5 * 2**30, op_overhead=0.0)
    cfg = compose_cfg("model=tiny", "per_device_train_batch_size=8")
    seen = []
    found = search(cfg, 8, hw, 0.0, 0.1, seen.append, trace=fake_trace,
                   executor=concurrent.futures.ThreadPoolExecutor(1))
    for ep in (1, 8):  # the tiny Mixtral's 8 experts: without EP, and over a node's 8 GPUs
        tried = [(c.changes["model.activation_checkpointing"],
                  c.changes["per_device_train_batch_size"], c.fits) for c in seen
                 if c.changes["parallel.expert_parallel"] == ep]
        assert tried == [(False, 1, True), (False, 2, True), (False, 4, False),
                         (True, 4, True), (True, 8, False)]
    ranked = [(c.changes["model.activation_checkpointing"],
               c.changes["per_device_train_batch_size"]) for c in found if c.fits]
    assert ranked[::2] == [(True, 4), (False, 2), (False, 1)]  # 4 pairs per micro-batch first
    assert all(c.changes["gradient_accumulation_steps"] * c.changes[
        "per_device_train_batch_size"] == 8 for c in found)  # pairs per step kept
    command = found[0].command(["model=tiny", "per_device_train_batch_size=8"], 8, hw)
    assert command == ("torchrun --standalone --nproc_per_node 8 --no-python moedpo train "
                       "model=tiny parallel.replicate=1 parallel.expert_parallel="
                       f"{found[0].changes['parallel.expert_parallel']} "
                       "per_device_train_batch_size=4 "
                       "gradient_accumulation_steps=2 model.activation_checkpointing=true")


def test_plan_search_prints_ready_commands():
    done = subprocess.run([sys.executable, "-m", "moedpo", "plan", *STEP, "--search",
                           "--hardware", "cpu", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=True)
    found = json.loads(done.stdout)["candidates"]
    assert [c["changes"]["per_device_train_batch_size"] for c in found] == [2, 1]  # fastest
    assert found[0]["pairs_per_second"] > found[1]["pairs_per_second"]
    assert found[0]["command"].startswith("moedpo train model=tiny max_length=256 ")
    assert found[1]["command"].endswith("per_device_train_batch_size=1 "
                                        "gradient_accumulation_steps=2 "
                                        "model.activation_checkpointing=false")
    assert done.stderr.count("traced: replicate 1") == 2  # progress per variant


def test_a_run_with_plan_memory_logs_the_planned_peak(make_cfg, caplog):
    """`plan_memory=true`: every train row holds the peak `moedpo plan` prints for the same
    config; a plan that fails is said once and gives no figure."""
    from moedpo.planner import PlannedPeak
    from moedpo.trainer import run

    overrides = [*tiny_train_overrides(), "max_steps=2", "report_metrics_freq=1"]
    result = run(make_cfg(*overrides, "plan_memory=true"))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text()
            .splitlines()]
    planned = [r["train/memory/planned_peak"] for r in rows if "train/loss" in r]
    done = subprocess.run([sys.executable, "-m", "moedpo", "plan", *overrides, "--hardware",
                           "cpu", "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=True)
    assert planned == [json.loads(done.stdout)["peak_bytes_per_device"]] * 2
    failed = PlannedPeak(make_cfg(*overrides), devices=0)
    assert failed.result() is None and failed.result() is None
    assert caplog.text.count("plan_memory: the step could not be planned (ConfigError: "
                             "--devices 0") == 1
