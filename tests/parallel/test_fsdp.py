"""FSDP2 across 2 CPU processes (torchrun, gloo) equals one process on the same global batch."""

import subprocess
import sys
import time

import pytest
import torch

from conftest import (
    ROOT,
    assert_same_run,
    assert_same_update,
    final_weights,
    run_ok,
    train_rows,
    wait_for,
    write_tiny_deepseek,
    write_unpaired,
)
from moedpo.checkpoint import COMPLETE, save_weights
from moedpo.config import ModelConfig
from moedpo.models.load import build_models

# The slow tier (make test-slow): each test here is two or four torchrun processes. The fast
# tier keeps one 2-rank run that goes through FSDP2 and the expert exchange together
# (test_expert.py, dropless) and the one-process runs these compare against.
pytestmark = pytest.mark.slow

COMMON = ["+experiment=demo", "max_steps=3", "dry_run=true", "shuffle=true",
          "eval_frequency=2", "data.static_shapes=true", "max_length=64",
          "max_prompt_length=32"]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "run_dpo_no_trainer.py", *args]


def single(*args: str) -> list[str]:
    return [sys.executable, "run_dpo_no_trainer.py", *args]


def kill_after_checkpoint_and_resume(cmd: list[str], out, exp_name: str, step: int) -> None:
    """Run `cmd` (writing under `out`), SIGKILL it and its ranks once the checkpoint of `step`
    is complete, then run it again to the end (it resumes)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(out / exp_name / "checkpoints" / f"step_{step:08d}" / COMPLETE, proc, 300)
    # The launcher and both ranks at once (torchrun's workers outlive a killed launcher).
    subprocess.run(["pkill", "-KILL", "-f", f"output_dir={out}"], check=True)
    proc.wait()
    time.sleep(0.5)
    run_ok(cmd)


@pytest.mark.parametrize("moe", [[], ["model.capacity_factor=1.0"]], ids=["dropless", "dropped"])
def test_two_ranks_equal_one_process(tmp_path, one_process, moe):
    one = one_process(*COMMON, *moe, "per_device_train_batch_size=4")
    run_ok(torchrun(*COMMON, *moe, "per_device_train_batch_size=2", f"output_dir={tmp_path}",
                    "exp_name=two"))
    # Log-prob sums (~-80) within 1e-5 of their size: float32 sums of per-rank gradients in
    # another order move the weights by rounding, and a sum over 2 x 64 tokens shows it.
    assert_same_run(one, tmp_path / "two", atol=1e-5, rel=1e-5)


def test_packed_shared_prompt_rows_on_two_ranks_equal_one_process(tmp_path):
    """data.packing (several pairs a row, prompts shared) under FSDP2 on 2 ranks: each rank
    packs its own pairs; the run equals one process packing all of them."""
    args = [*(a for a in COMMON if not a.startswith("data.static_shapes")),
            "data.packing=true", f"output_dir={tmp_path}"]
    run_ok(single(*args, "per_device_train_batch_size=4", "exp_name=one"))
    run_ok(torchrun(*args, "per_device_train_batch_size=2", "exp_name=two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rel=1e-5)


def test_token_budget_on_two_ranks_equals_one_process_by_count(tmp_path):
    """data.tokens_per_batch on 2 ranks: each rank cuts its 4 pairs by a 150-token budget
    (ranks whose pairs fit in fewer forwards split one, so both run as many); the run equals
    one process taking its 8 pairs in one forward (router losses off: they are per forward)."""
    args = [*(a for a in COMMON if not a.startswith("data.static_shapes")),
            "model.router_aux_loss_coef=0", "model.router_z_loss_coef=0",
            f"output_dir={tmp_path}"]
    run_ok(single(*args, "per_device_train_batch_size=8", "exp_name=one"))
    run_ok(torchrun(*args, "per_device_train_batch_size=4", "data.tokens_per_batch=150",
                    "exp_name=two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rel=1e-5,
                    ignore=("aux_loss", "z_loss"))
    assert min(r["train/forwards"] for r in train_rows(tmp_path / "two")
               if "train/forwards" in r) > 1


@pytest.mark.parametrize("loss", ["kto", "bco"])
def test_unpaired_losses_on_two_ranks_equal_one_process(tmp_path, loss):
    """KTO's per-micro-batch KL estimate and BCO's reward shift (averaged over ranks) on 2
    ranks equal one process. 40 eval rows in the demo's eval batch of 50 leave rank 1 with
    no eval row at all: its metrics window holds no keys, and the reduce must still agree."""
    rows = write_unpaired(tmp_path / "rows", 20, 20)
    args = [*(a for a in COMMON if a != "dry_run=true"), "dry_run=false", f"loss.name={loss}",
            f"datasets=[{rows}]", f"output_dir={tmp_path}"]
    run_ok(single(*args, "per_device_train_batch_size=4", "exp_name=one"))
    run_ok(torchrun(*args, "per_device_train_batch_size=2", "exp_name=two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rel=1e-5)


def test_router_bias_updates_on_two_ranks_equal_one_process(tmp_path):
    """DeepSeek-V3's aux-loss-free balancing under FSDP2: the step's expert counts summed
    over ranks, so both ranks move their copy of the biases alike, as one process does."""
    model = write_tiny_deepseek(tmp_path / "tiny-deepseek.json")
    args = [*COMMON, f"model.config_path={model}", "model.router_bias_update_rate=0.01",
            f"output_dir={tmp_path}"]
    run_ok(single(*args, "per_device_train_batch_size=4", "exp_name=one"))
    run_ok(torchrun(*args, "per_device_train_batch_size=2", "exp_name=two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rel=1e-5)
    biases = {k: v for k, v in final_weights(tmp_path / "two" / "checkpoints").items()
              if k.endswith("e_score_correction_bias")}
    assert biases and any(v.abs().sum() > 0 for v in biases.values())


def test_streamed_training_on_two_ranks_equals_one_process(tmp_path):
    """data.streaming under FSDP2: both ranks read the same seeded stream and take their own
    share of each step's pairs, as one process takes them all."""
    base = [*(a for a in COMMON if not a.startswith("data.static_shapes")),
            f"output_dir={tmp_path}"]
    args = [*base, "data.streaming=true", "data.shuffle_buffer=64"]
    run_ok(single(*args, "per_device_train_batch_size=4", "exp_name=one"))
    run_ok(torchrun(*args, "per_device_train_batch_size=2", "exp_name=two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rel=1e-5)
    # and the stream is what both trained on: the in-memory order is another run
    run_ok(single(*base, "per_device_train_batch_size=4", "exp_name=whole"))
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "one", tmp_path / "whole", atol=1e-5, rel=1e-5)


def test_streamed_two_rank_kill_and_resume_equals_a_straight_run(tmp_path):
    """data.streaming on 2 ranks, SIGKILLed after step 4's checkpoint: the resumed run reads
    the stream again up to where the checkpoint says and ends as the straight run."""
    args = [*(a for a in COMMON if not a.startswith("data.static_shapes")), "max_steps=8",
            "dry_run=false", "data.streaming=true", "data.shuffle_buffer=64",
            "per_device_train_batch_size=2", "checkpoint.save_frequency=2",
            "eval_frequency=4", f"output_dir={tmp_path}"]
    run_ok(torchrun(*args, "exp_name=straight"))
    kill_after_checkpoint_and_resume(torchrun(*args, "exp_name=killed"), tmp_path, "killed", 4)
    assert_same_run(tmp_path / "straight", tmp_path / "killed", atol=1e-6)


@pytest.mark.parametrize("start", ["seeded", "checkpoint"])
def test_lora_on_two_ranks_equals_one_process(tmp_path, start):
    """LoRA under FSDP2: built on the meta device (the default under torchrun), the base
    and adapters broadcast from rank 0 or, from checkpoint_manager_path, each rank reading
    its base shards and drawing its adapter shards; adapters (expert adapters included)
    sharded with their layers, the reference the same sharded model with adapters off. The
    run (and the adapters, all the checkpoint holds) equals one process's, which builds the
    model whole."""
    # The demo's lr: Adam moves each adapter element by ~lr whatever its gradient's size,
    # so an element whose gradient is rounding-small differs by up to ~lr x its relative
    # rounding; at lr 3e-3 the expert adapters of the last layer differ by 1.1e-5.
    args = [*COMMON, "model.lora.r=4", f"output_dir={tmp_path}"]
    if start == "checkpoint":
        base, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                           policy_dtype="float32"), seed=5,
                               with_reference=False)
        save_weights(base, str(tmp_path / "weights"))
        args.append(f"checkpoint_manager_path={tmp_path / 'weights'}")
    run_ok(single(*args, "per_device_train_batch_size=4", "exp_name=one"))
    run_ok(torchrun(*args, "per_device_train_batch_size=2", "exp_name=two"))
    if start == "checkpoint":
        assert "(each process its shards)" in (tmp_path / "two" / "train.log").read_text()
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rel=1e-5)
    weights = final_weights(tmp_path / "two" / "checkpoints")
    assert weights and all("lora_" in k for k in weights)


def test_lora_with_a_bf16_policy_on_two_ranks_trains_as_one_process(tmp_path):
    """bf16 compute, float32 adapter masters: the reference (adapters off, which PEFT marks
    frozen) runs the first forward under FSDP2, where FSDP2 fixes each group's gradient
    dtype from the parameters trainable at that moment; with the adapters frozen there the
    backward failed assigning bf16 gradients to float32 masters (found by `moedpo plan`).
    The run matches one process's to bf16 rounding."""
    args = [*COMMON, "model.lora.r=4", "model.policy_dtype=bfloat16",
            "model.reference_dtype=bfloat16", f"output_dir={tmp_path}"]
    run_ok(single(*args, "per_device_train_batch_size=4", "exp_name=one"))
    run_ok(torchrun(*args, "per_device_train_batch_size=2", "exp_name=two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=2e-2, rel=2e-2)


def test_global_batch_router_loss_on_two_ranks_equals_one_process(tmp_path):
    """model.router_aux_loss_scope=global_batch: the expert shares pooled over the ranks'
    halves of each micro-batch (and over accumulated micro-batches), so 2 ranks train as
    one process does; each rank's own shares (micro_batch) train another model."""
    args = [*COMMON, "model.router_aux_loss_coef=0.5", f"output_dir={tmp_path}"]
    scope = "model.router_aux_loss_scope="
    run_ok(single(*args, "per_device_train_batch_size=4", f"{scope}global_batch",
                  "exp_name=one"))
    run_ok(torchrun(*args, "per_device_train_batch_size=2", f"{scope}global_batch",
                    "exp_name=two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rel=1e-5)
    # and over 2 accumulated micro-batches too: the pre-pass's counts summed over ranks
    run_ok(torchrun(*args, "per_device_train_batch_size=1", "gradient_accumulation_steps=2",
                    f"{scope}global_batch", "exp_name=accumulated"))
    assert_same_run(tmp_path / "one", tmp_path / "accumulated", atol=1e-5, rel=1e-5)
    run_ok(torchrun(*args, "per_device_train_batch_size=2", f"{scope}micro_batch",
                    "exp_name=local"))
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "one", tmp_path / "local", atol=1e-5, rel=1e-5)


def test_meta_init_reads_checkpoint_shards_with_reference_offloaded(tmp_path, one_process):
    """checkpoint_manager_path under FSDP2: models built on the meta device, each rank reads
    its shards, the reference lives in host memory between uses; same run as one process."""
    policy, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                         policy_dtype="float32"), seed=5)
    save_weights(policy, str(tmp_path / "weights"))
    args = [*COMMON, f"checkpoint_manager_path={tmp_path / 'weights'}", f"output_dir={tmp_path}"]
    run_ok(single(*args, "per_device_train_batch_size=4", "exp_name=one"))
    two = torchrun(*args, "per_device_train_batch_size=2", "exp_name=two",
                   "reference.cpu_offload=true")
    log = subprocess.run(two, cwd=ROOT, capture_output=True, text=True)
    assert log.returncode == 0, log.stderr[-3000:]
    assert "(each process its shards)" in log.stdout + log.stderr
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rel=1e-5)
    # and the checkpoint's weights are what both trained from
    seed_init = one_process(*COMMON, "per_device_train_batch_size=4")
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "one", seed_init, atol=1e-5)


@pytest.mark.parametrize("meta", ["true", "false"])
def test_pretrained_folder_on_two_ranks_equals_one_process(tmp_path, one_process,
                                                           tiny_mixtral_dir, meta):
    """Weights from a saved pretrained folder, as users load them: read shard by shard into
    meta-built models, or through from_pretrained on each rank (where transformers 5.25 turns
    Hub kernels on unless moedpo says otherwise); the same run as one process."""
    args = [*COMMON, "model.config_path=null", f"model.name_or_path={tiny_mixtral_dir}"]
    one = one_process(*args, "per_device_train_batch_size=4")
    run_ok(torchrun(*args, f"model.meta_init={meta}", "per_device_train_batch_size=2",
                    f"output_dir={tmp_path}", "exp_name=two"))
    assert_same_run(one, tmp_path / "two", atol=1e-5, rel=1e-5)


def test_mixture_eval_on_two_ranks_equals_one_process_per_source(tmp_path):
    """Eval over several ranks: two sources of 13 and 8 eval pairs (21: rank 1's last batch
    holds one valid pair, and the per-source groups split unevenly across ranks), after 3
    steps; every eval metric, each source's included, equals one process, and each overall
    value is the count-weighted mean of the sources' (an identity of the per-pair means)."""
    from conftest import demo_rows, write_jsonl_gz

    for name, n_eval, skip in (("alpha", 13, 0), ("beta", 8, 100)):
        folder = tmp_path / name
        folder.mkdir()
        rows = demo_rows("train", 200)
        write_jsonl_gz(folder / "train.jsonl.gz", rows[skip:skip + 60])
        write_jsonl_gz(folder / "test.jsonl.gz", demo_rows("test", 40)[skip % 40:][:n_eval])
    args = [*COMMON, "dry_run=false", "eval_frequency=3",
            f"datasets=[{tmp_path / 'alpha'},{tmp_path / 'beta'}]", f"output_dir={tmp_path}"]
    run_ok(single(*args, "per_device_train_batch_size=4", "per_device_eval_batch_size=8",
                  "exp_name=one"))
    run_ok(torchrun(*args, "per_device_train_batch_size=2", "per_device_eval_batch_size=4",
                    "exp_name=two"))
    assert_same_run(tmp_path / "one", tmp_path / "two", atol=1e-5, rel=1e-5)
    last = [r for r in train_rows(tmp_path / "two") if "eval/loss" in r][-1]
    assert last["step"] == 3
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        mixed = (13 * last[f"eval/alpha/{key}"] + 8 * last[f"eval/beta/{key}"]) / 21
        assert last[f"eval/{key}"] == pytest.approx(mixed, rel=1e-6, abs=1e-7), key
    assert last["eval/alpha/loss"] != pytest.approx(last["eval/beta/loss"], abs=1e-4)


def test_two_rank_kill_and_resume(tmp_path):
    """With TR-DPO's hard sync every 2 steps: the sharded reference is the policy at each
    checkpoint, and a resumed run reads it back (or it would train against the old one)."""
    args = [*COMMON, "max_steps=8", "dry_run=false", "per_device_train_batch_size=4",
            "gradient_accumulation_steps=2", "checkpoint.save_frequency=2",
            "reference.sync_every=2", "reference.sync_alpha=1.0", f"output_dir={tmp_path}"]
    run_ok(torchrun(*args, "exp_name=straight"))
    saved = final_weights(tmp_path / "straight" / "checkpoints", ("model.", "reference."))
    policy = {k: v for k, v in saved.items() if k.startswith("model.")}
    assert policy and all(torch.equal(v, saved["reference." + k.removeprefix("model.")])
                          for k, v in policy.items())
    kill_after_checkpoint_and_resume(torchrun(*args, "exp_name=killed"), tmp_path, "killed", 4)
    assert_same_run(tmp_path / "straight", tmp_path / "killed", atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["parallel.expert_parallel=2"]], ids=["fsdp", "ep2"])
def test_bf16_policy_under_fsdp2_trains_float32_masters(tmp_path, one_process, extra):
    """A bf16 policy on 2 ranks: FSDP2 keeps float32 sharded masters (saved as such) and
    computes in bf16; at a DPO learning rate its update is the one-process mixed-precision
    update (both differ from it only by bf16 rounding of the gradients). With expert
    parallelism the experts compute in bf16 on their ranks and exchange bf16 rows."""
    args = [*COMMON, "max_steps=2", "lr=5e-6", "sched.warmup_steps=0", "eval_frequency=100",
            "model.policy_dtype=bfloat16", "model.reference_dtype=bfloat16"]
    one = one_process(*args, "per_device_train_batch_size=4")
    run_ok(torchrun(*args, *extra, "per_device_train_batch_size=2", f"output_dir={tmp_path}",
                    "exp_name=two"))
    assert_same_update(one, tmp_path / "two")


def torchrun4(*args: str) -> list[str]:
    cmd = torchrun(*args)
    cmd[cmd.index("--nproc_per_node") + 1] = "4"
    return cmd


# 4 ranks at lr 1e-4: at the demo's 1e-3 the 4-way sums' rounding can flip a router near-tie
# (see test_expert.py's 4-rank run).
HSDP = [*COMMON, "lr=1e-4"]


# Slow tier: 4 torchrun ranks; the strategy's refusals and registry are tested in
# tests/parallel/test_strategy.py, and FSDP2's path in the fast 2-rank EP run.
@pytest.mark.parametrize("ep", [[], ["parallel.expert_parallel=2"]], ids=["hsdp", "hsdp_ep2"])
def test_hsdp_on_four_ranks_equals_one_process(tmp_path, one_process, ep):
    """parallel.replicate=2 on 4 ranks: 2 groups of 2 consecutive ranks, each weight sharded
    within a group and replicated across (with EP the experts split 2 ways inside each
    group too): the same run as one process."""
    one = one_process(*HSDP, "per_device_train_batch_size=4")
    run_ok(torchrun4(*HSDP, *ep, "parallel.replicate=2", "per_device_train_batch_size=1",
                     f"output_dir={tmp_path}", "exp_name=hsdp"))
    log = (tmp_path / "hsdp" / "train.log").read_text()
    assert "HSDP: every weight sharded over the 2 ranks of each of 2 groups" in log
    assert ("(erep 2 x efsdp 1 x ep 2)" in log) == bool(ep)
    assert_same_run(one, tmp_path / "hsdp", atol=1e-5, rel=1e-5)


def test_an_hsdp_checkpoint_resumes_as_plain_fsdp2(tmp_path, one_process):
    """Two steps under HSDP (replicate 2 x shard 2), the third resumed from its checkpoint
    with every weight sharded over all 4 ranks: DCP reshards, and the run equals one process
    (and so the unbroken run)."""
    steps = [*HSDP, "report_metrics_freq=1"]  # the first run's last step is reported anyway
    args = [*steps, "per_device_train_batch_size=1", f"output_dir={tmp_path}", "exp_name=mixed"]
    run_ok(torchrun4(*args, "parallel.replicate=2", "max_steps=2"))
    run_ok(torchrun4(*args, "parallel.replicate=1", "max_steps=3"))
    log = (tmp_path / "mixed" / "train.log").read_text()
    assert "resumed from" in log and "FSDP2: every weight sharded over the 4 ranks" in log
    assert_same_run(one_process(*steps, "per_device_train_batch_size=4"), tmp_path / "mixed",
                    atol=1e-5, rel=1e-5)
