"""torch_xla SPMD on 4 virtual CPU devices equals the plain CPU trainer on the same global
batch, and compiles its step graph once.

Needs the torch_xla environment (torch 2.9 + torch_xla 2.9 cannot share a venv with the
project's torch): `make test-xla` builds or reuses it with scripts/xla_env.sh and points
MOEDPO_XLA_PYTHON at it; CI runs that stage after `make test`.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, assert_same_run, assert_same_update, compose_cfg, run_ok
from moedpo.data import build_data, collate, train_indices
from moedpo.models.load import load_tokenizer

XLA_PYTHON = os.environ.get("MOEDPO_XLA_PYTHON")
pytestmark = pytest.mark.skipif(not XLA_PYTHON, reason="MOEDPO_XLA_PYTHON not set: run "
                                "`make test-xla` for the torch_xla tests")
DEVICES = 4
COMMON = ["+experiment=demo", "max_steps=6", "dry_run=true", "shuffle=true",
          "eval_frequency=3", "report_metrics_freq=1", "max_length=64", "max_prompt_length=32",
          "loggers=[]"]


def xla_env() -> dict[str, str]:
    return {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(DEVICES),
            "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def run_xla(*args: str) -> None:
    done = subprocess.run([XLA_PYTHON, "run_dpo_no_trainer.py", *args], cwd=ROOT, env=xla_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(("tp", "moe", "xla_only"), [
    (1, "model.moe_implementation=dense", []),
    (2, "model.capacity_factor=1.25", []),
    # an expert axis: mesh (fsdp 2, expert 2, tensor 1), experts split by expert id
    (1, "model.capacity_factor=1.25", ["parallel.expert_parallel=2"]),
    (1, "model.moe_implementation=dense", ["parallel.expert_parallel=2"]),
], ids=["tp1-dense", "tp2-dropped", "ep2-dropped", "ep2-dense"])
def test_spmd_equals_cpu_and_compiles_once(tmp_path, tp, moe, xla_only):
    out = f"output_dir={tmp_path}"
    # Same global batch of 8 pairs: 2 per device on the 4-device mesh, 8 in one CPU process.
    run_ok([sys.executable, "run_dpo_no_trainer.py", *COMMON, moe, "data.static_shapes=true",
            "per_device_train_batch_size=8", "per_device_eval_batch_size=8", out,
            "exp_name=cpu"])
    run_xla(*COMMON, moe, f"tensor_parallelism={tp}", *xla_only,
            "per_device_train_batch_size=2", "per_device_eval_batch_size=2", out,
            "exp_name=xla")
    if xla_only:
        log = (tmp_path / "xla" / "train.log").read_text()
        assert "SPMD mesh (2, 2, 1) over axes ('fsdp', 'expert', 'tensor')" in log
    # Losses within 1e-4; log-prob sums (~-80 here) within 1e-5 of their size; expert loads
    # within 1% (a near-tie in the router can round either way and move one slot).
    assert_same_run(tmp_path / "cpu", tmp_path / "xla", atol=1e-4, rel=1e-5, routing_atol=0.01)

    rows = [json.loads(line) for line in (tmp_path / "xla/metrics.jsonl").read_text().splitlines()
            if '"train/' in line]
    compiles = [r["train/xla_compiles"] for r in rows]
    assert len(compiles) == 6
    # Step 0 compiles the step without optimizer state, step 1 with it; then nothing new,
    # though the eval at step 3 ran in between and the learning rate changed every step.
    assert compiles[1:] == [compiles[1]] * 5, compiles


def test_length_buckets_compile_one_step_graph_per_bucket(tmp_path):
    """data.length_buckets on XLA: each batch is padded to the shortest bucket that fits, a
    graph per bucket is compiled the first time it is needed and reused after; the run equals
    the CPU trainer padding to the same buckets."""
    buckets = [64, 96, 128]
    args = [*COMMON, "max_steps=8", "max_length=128", "max_prompt_length=64",
            "data.length_buckets=[64,96]", "do_first_eval=false", "eval_frequency=1000",
            "model.moe_implementation=dense", f"output_dir={tmp_path}"]
    run_ok([sys.executable, "run_dpo_no_trainer.py", *args, "data.static_shapes=true",
            "per_device_train_batch_size=8", "per_device_eval_batch_size=8", "exp_name=cpu"])
    run_xla(*args, "per_device_train_batch_size=2", "per_device_eval_batch_size=2",
            "exp_name=xla")
    assert_same_run(tmp_path / "cpu", tmp_path / "xla", atol=1e-4, rel=1e-5, routing_atol=0.01)

    # Each step's bucket, from the same pairs on the host.
    cfg = compose_cfg(*args, "per_device_train_batch_size=2")
    data = build_data(cfg, load_tokenizer(cfg.model), 10**6, DEVICES)
    stream = train_indices(len(data.train), 2 * DEVICES, cfg.seed, cfg.shuffle)
    lengths = [collate([data.train[i] for i in next(stream)], 0, -100, buckets)
               ["input_ids"].shape[1] for _ in range(8)]
    assert len(set(lengths)) > 1 and lengths[-1] in lengths[1:-1]  # the data does vary
    # One graph for step 0 (no optimizer state yet), then one per bucket with state.
    graphs = [len({(lengths[0], False)} | {(n, True) for n in lengths[1:step + 1]})
              for step in range(8)]
    rows = [json.loads(line) for line in (tmp_path / "xla/metrics.jsonl").read_text().splitlines()
            if '"train/' in line]
    compiles = [r["train/xla_compiles"] for r in rows]
    assert [n - compiles[0] for n in compiles] == [n - graphs[0] for n in graphs], \
        (lengths, compiles)


def test_xla_rejects_dropless(tmp_path):
    done = subprocess.run([XLA_PYTHON, "run_dpo_no_trainer.py", *COMMON,
                           "model.moe_implementation=dropless", f"output_dir={tmp_path}"],
                          cwd=ROOT, env=xla_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "model.moe_implementation=dropless has data-dependent shapes" in done.stderr


def test_spmd_resume_equals_straight_run(tmp_path):
    args = [*COMMON, "max_steps=5", "per_device_train_batch_size=2",
            "per_device_eval_batch_size=2", f"output_dir={tmp_path}"]
    run_xla(*args, "exp_name=straight")
    run_xla(*args, "exp_name=resumed", "checkpoint.save_frequency=2")
    checkpoints = tmp_path / "resumed/checkpoints"
    for later in ("step_00000004", "step_00000005"):  # as if stopped after step 2
        shutil.rmtree(checkpoints / later)
    run_xla(*args, "exp_name=resumed")  # resume=auto picks step_00000002
    # Weights within 1e-6; metrics within 1e-6 of their size: the resumed process compiles
    # its step graph afresh, and XLA's CPU fusion may round the last bits of a long sum
    # otherwise (seen: log-prob sums of -145 by 3.8e-6, a gradient norm of 1.54 by 1.1e-6).
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", atol=1e-6, rel=1e-6)


def test_spmd_meta_init_reads_checkpoint_shards(tmp_path):
    """checkpoint_manager_path on XLA: built on the meta device, sharded while still empty,
    each shard read by torch_xla's planner; the same run as the CPU trainer from that file."""
    weights = tmp_path / "weights"
    save_perturbed_dcp(weights)
    args = [*COMMON, "max_steps=3", "model.moe_implementation=dense",
            f"checkpoint_manager_path={weights}", f"output_dir={tmp_path}"]
    run_ok([sys.executable, "run_dpo_no_trainer.py", *args, "data.static_shapes=true",
            "per_device_train_batch_size=8", "per_device_eval_batch_size=8", "exp_name=cpu"])
    done = subprocess.run([XLA_PYTHON, "run_dpo_no_trainer.py", *args, "exp_name=xla",
                           "per_device_train_batch_size=2", "per_device_eval_batch_size=2"],
                          cwd=ROOT, env=xla_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(each process its shards)" in done.stdout + done.stderr
    assert_same_run(tmp_path / "cpu", tmp_path / "xla", atol=1e-4, rel=1e-5, routing_atol=0.01)


SEED_TPU = ["parallel.backend=xla", "data.static_shapes=true", "max_steps=3"]


def save_perturbed_dcp(folder) -> None:
    """A DCP checkpoint of the tiny Mixtral with other weights (seed 5) than the pretrained
    folder's, written by the XLA venv's older torch so both venvs read it."""
    save = ("from moedpo.config import ModelConfig; from moedpo.models.load import build_models;"
            " from moedpo.checkpoint import save_weights;"
            " p, _ = build_models(ModelConfig(config_path='tiny-mixtral.json',"
            f" policy_dtype='float32'), seed=5); save_weights(p, '{folder}')")
    run_ok([XLA_PYTHON, "-c", save])


@pytest.mark.parametrize("weights", ["pretrained", "pretrained+dcp"])
def test_seed_tpu_command_on_a_pretrained_folder_equals_cpu(tiny_mixtral_dir, tmp_path, weights):
    """The seed's TPU command as users run it: weights from a saved pretrained folder through
    from_pretrained (or its config plus a DCP checkpoint_manager_path, read shard by shard),
    with transformers' `kernels` package installed (5.25 turns Hub kernels on in
    from_pretrained, and kernelizing for the 'xla' device raised at the first eval). 3 steps on
    4 virtual devices equal the CPU trainer within 1e-4."""
    run_ok([XLA_PYTHON, "-c", "import kernels, transformers; "
            "assert transformers.__version__ >= '5.25', transformers.__version__"])
    args = [*COMMON, *SEED_TPU, "model.config_path=null",
            f"model.name_or_path={tiny_mixtral_dir}", f"output_dir={tmp_path}"]
    if weights == "pretrained+dcp":
        save_perturbed_dcp(tmp_path / "weights")
        args.append(f"checkpoint_manager_path={tmp_path / 'weights'}")
    run_ok([sys.executable, "run_dpo_no_trainer.py", *args, "parallel.backend=cpu",
            "per_device_train_batch_size=8", "per_device_eval_batch_size=8", "exp_name=cpu"])
    run_xla(*args, "per_device_train_batch_size=2", "per_device_eval_batch_size=2",
            "exp_name=xla")
    assert_same_run(tmp_path / "cpu", tmp_path / "xla", atol=1e-4, rel=1e-5, routing_atol=0.01)
    rows = [json.loads(x) for x in (tmp_path / "xla/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [0, 1, 2]


def test_hub_kernels_on_xla_is_one_line(tmp_path):
    done = subprocess.run([XLA_PYTHON, "run_dpo_no_trainer.py", *COMMON, *SEED_TPU,
                           "model.hub_kernels=true", f"output_dir={tmp_path}"],
                          cwd=ROOT, env=xla_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "moedpo: error: model.hub_kernels=true: the Hub's kernels package has no XLA " \
        "kernels" in done.stderr
    assert "Traceback" not in done.stderr


def test_bf16_policy_on_spmd_trains_float32_masters(tmp_path):
    """Mixed precision on XLA: float32 master weights sharded over the mesh, the step
    computed on their bf16 copy inside the one graph; the update is the CPU trainer's."""
    args = [*COMMON, "max_steps=2", "lr=5e-6", "sched.warmup_steps=0", "eval_frequency=100",
            "model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16",
            "model.moe_implementation=dense", f"output_dir={tmp_path}"]
    run_ok([sys.executable, "run_dpo_no_trainer.py", *args, "data.static_shapes=true",
            "per_device_train_batch_size=8", "per_device_eval_batch_size=8", "exp_name=cpu"])
    run_xla(*args, "per_device_train_batch_size=2", "per_device_eval_batch_size=2",
            "exp_name=xla")
    assert_same_update(tmp_path / "cpu", tmp_path / "xla")


def test_bin_packing_equals_cpu_and_compiles_per_row_count(tmp_path):
    """data.packing=true under SPMD: each global micro-batch's shared-prompt blocks are
    bin-packed into rows of exactly 2 x max_length tokens, the row count rounded up to a
    multiple of the 4 devices; one step graph per row count, and the run equals the CPU
    trainer on the plain static layout."""
    from moedpo.data import collate_shared

    args = [*COMMON, "max_steps=8", "do_first_eval=false", "eval_frequency=1000",
            "model.moe_implementation=dense", f"output_dir={tmp_path}"]
    run_ok([sys.executable, "run_dpo_no_trainer.py", *args, "data.static_shapes=true",
            "per_device_train_batch_size=8", "per_device_eval_batch_size=8", "exp_name=cpu"])
    run_xla(*args, "data.packing=true", "per_device_train_batch_size=2",
            "per_device_eval_batch_size=2", "exp_name=xla")
    assert_same_run(tmp_path / "cpu", tmp_path / "xla", atol=1e-4, rel=1e-5, routing_atol=0.01)

    cfg = compose_cfg(*args, "per_device_train_batch_size=2")
    data = build_data(cfg, load_tokenizer(cfg.model), 10**6, DEVICES)
    stream = train_indices(len(data.train), 2 * DEVICES, cfg.seed, cfg.shuffle)
    rows = [collate_shared([data.train[i] for i in next(stream)], 0, -100, 128, 128,
                           row_multiple=DEVICES)["input_ids"].shape for _ in range(8)]
    assert all(r[1] == 128 for r in rows) and max(r[0] for r in rows) < 2 * 8  # < plain's 16
    graphs = [len({(rows[0][0], False)} | {(r[0], True) for r in rows[1:step + 1]})
              for step in range(8)]
    lines = (tmp_path / "xla/metrics.jsonl").read_text().splitlines()
    compiles = [json.loads(x)["train/xla_compiles"] for x in lines if '"train/' in x]
    assert [n - compiles[0] for n in compiles] == [n - graphs[0] for n in graphs], \
        (rows, compiles)
