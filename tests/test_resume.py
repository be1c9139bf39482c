"""Checkpoints, exact resume, preemption and non-finite steps."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moedpo.step as step_module
import moedpo.trainer as train_module
from conftest import ROOT, final_weights, tiny_train_overrides, train_rows, wait_for
from moedpo.checkpoint import COMPLETE, Checkpointer, CheckpointError
from moedpo.optim import NonFiniteError
from moedpo.trainer import run


def cli(*args: str, out: Path) -> list[str]:
    return [sys.executable, "run_dpo_no_trainer.py", *args, f"output_dir={out}"]


RESUME_ARGS = ["+experiment=demo", "max_steps=12", "per_device_train_batch_size=8",
               "gradient_accumulation_steps=2", "shuffle=true", "eval_frequency=5",
               "report_metrics_freq=2", "checkpoint.save_frequency=4", "max_length=96"]


# Slow tier: a killed subprocess and its resume. The fast tier resumes exactly in-process
# (test_checkpoint_roundtrip_restores_model_optimizer_and_rng, data/test_stream.py, BCO's and
# TR-DPO's resume tests) and checkpoints on a signal (test_sigusr1_saves_and_training_goes_on).
@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model.lora.r=4"]], ids=["full", "lora"])
def test_kill_and_resume_matches_an_unbroken_run(tmp_path, extra):
    straight = subprocess.run(cli(*RESUME_ARGS, *extra, "exp_name=straight", out=tmp_path),
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    args = cli(*RESUME_ARGS, *extra, "exp_name=killed", out=tmp_path)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(tmp_path / "killed" / "checkpoints" / "step_00000004" / COMPLETE, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr + resumed.stdout

    assert train_rows(tmp_path / "killed") == train_rows(tmp_path / "straight")
    a = final_weights(tmp_path / "straight" / "checkpoints")
    b = final_weights(tmp_path / "killed" / "checkpoints")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if extra:  # a LoRA checkpoint holds the adapters alone
        assert a and all("lora_" in k for k in a)


def signal_after_first_train_row(tmp_path: Path, name: str, sig: int,
                                 extra: tuple[str, ...] = ()) -> tuple[list, int, str]:
    """Start a run, send `sig` once it has logged a train row; (args, exit code, output)."""
    args = cli(*RESUME_ARGS, "checkpoint.save_frequency=0", *extra, f"exp_name={name}",
               out=tmp_path)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = tmp_path / name / "metrics.jsonl"
    wait_for(metrics, proc)
    while '"train/loss"' not in metrics.read_text():
        time.sleep(0.005)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=300)
    return args, proc.returncode, output


STREAMED = ("data.streaming=true", "data.shuffle_buffer=64")


@pytest.mark.slow  # as the kill-and-resume test above
@pytest.mark.parametrize("extra", [(), STREAMED], ids=["in_memory", "streamed"])
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, extra):
    """SIGTERM at whatever step the run is in: a checkpoint there, exit 0, and the resumed run
    ends as an unbroken one. Streamed, the stop falls mid-epoch and mid shuffle buffer: the
    stream's position and buffer come back with the checkpoint."""
    args, code, output = signal_after_first_train_row(tmp_path, "term", signal.SIGTERM, extra)
    assert code == 0, output[-2000:]
    assert "stopped by SIGTERM" in output and "resume=auto" in output
    (saved,) = (tmp_path / "term" / "checkpoints").glob("step_*")
    assert (saved / COMPLETE).exists() and int(saved.name.split("_")[1]) < 12
    finished = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0
    steps = [r["step"] for r in train_rows(tmp_path / "term") if "train/loss" in r]
    assert steps == [0, 2, 4, 6, 8, 10, 11]
    straight = cli(*RESUME_ARGS, "checkpoint.save_frequency=0", *extra, "exp_name=straight",
                   out=tmp_path)
    assert subprocess.run(straight, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    a = final_weights(tmp_path / "straight" / "checkpoints")
    b = final_weights(tmp_path / "term" / "checkpoints")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_false_refuses_to_overwrite_checkpoints(make_cfg):
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=2")
    run(cfg)
    with pytest.raises(CheckpointError, match="resume=false but .* holds checkpoints"):
        run(make_cfg(*tiny_train_overrides(), "max_steps=2", "resume=false"))
    run(make_cfg(*tiny_train_overrides(), "max_steps=2", "resume=false", "overwrite=true"))
    assert (cfg.run_dir / "metrics.jsonl.prev1").exists()


def test_partial_save_is_ignored_cleaned_and_previous_kept(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
    good = ckpt.save(1, model, optimizer, {"step": 1})
    # A save that dies after DCP wrote its shards (disk full while writing the state).
    import moedpo.checkpoint as checkpoint_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.json, "dump", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left.*step_00000001 is untouched"):
        ckpt.save(2, model, optimizer, {"step": 2})
    monkeypatch.undo()
    assert ckpt.latest() == good and not list(tmp_path.glob(".tmp-*"))
    # A crash can also leave a temporary folder or a step folder without its marker.
    (tmp_path / ".tmp-step_00000003").mkdir()
    (tmp_path / "step_00000004").mkdir()
    assert ckpt.latest() == good
    ckpt.clean_partial()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_checkpoint_roundtrip_restores_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
    ckpt = Checkpointer(str(tmp_path))
    path = ckpt.save(2, model, optimizer, {"step": 2, "note": "x"})
    expected_next = torch.rand(3)
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    other(torch.randn(4, 3)).sum().backward()
    other_opt.step()
    torch.manual_seed(123)
    assert ckpt.load(path, other, other_opt) == ({"step": 2, "note": "x"}, {})
    assert torch.equal(torch.rand(3), expected_next)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["exp_avg"], other_opt.state[q]["exp_avg"])


def test_max_to_keep(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, model, optimizer, {"step": step})
    assert ckpt.complete_steps() == [2, 3]


def test_nonfinite_steps_are_skipped_counted_then_stop(make_cfg, monkeypatch):
    real = step_module.batch_loss
    calls = {"n": 0}

    def sometimes_nan(*args, poison=lambda n: n in (2, 3), **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if poison(calls["n"]):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(step_module, "batch_loss", sometimes_nan)
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=4", "do_first_eval=false",
                   "eval_frequency=100", "report_metrics_freq=1")
    result = run(cfg)
    rows = [r for r in train_rows(result.run_dir) if "train/nonfinite_steps" in r]
    assert [r["train/nonfinite_steps"] for r in rows] == [0, 1, 2, 2]
    assert [r["step"] for r in rows if "train/loss" in r] == [0, 3]  # skipped steps log no loss
    assert all(r["train/loss"] == r["train/loss"] for r in rows if "train/loss" in r)

    monkeypatch.setattr(step_module, "batch_loss",
                        lambda *a, **k: sometimes_nan(*a, poison=lambda n: True, **k))
    with pytest.raises(NonFiniteError, match="5 steps in a row"):
        run(make_cfg(*tiny_train_overrides(), "max_steps=8", "exp_name=nan", "resume=false"))


def test_secrets_never_reach_outputs(tmp_path):
    secret = "hf_secretTOKEN1234567890"
    env = {**os.environ, "HF_TOKEN": secret}
    result = subprocess.run(cli("+experiment=demo", "max_steps=2", "dry_run=true", out=tmp_path),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert secret not in result.stdout + result.stderr
    for path in (tmp_path / "demo").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_sigusr1_saves_and_training_goes_on(tmp_path):
    _, code, output = signal_after_first_train_row(tmp_path, "usr1", signal.SIGUSR1)
    assert code == 0 and "SIGUSR1 received" in output
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "usr1" / "checkpoints").glob(
        "step_*"))
    assert len(steps) == 2 and steps[0] < 12 == steps[1]  # the one asked for, and the final


def test_disk_full_inside_dcp_is_a_clean_error_and_leaves_nothing(tmp_path, monkeypatch):
    """DCP reports a failed write as its CheckpointException, a BaseException: it must still
    become the one-line error, and the partial folder must not stay to fill the disk."""
    from torch.distributed.checkpoint import filesystem
    from torch.distributed.checkpoint.api import CheckpointException

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
    good = ckpt.save(1, model, optimizer, {"step": 1})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", disk_full)
    with pytest.raises(CheckpointError, match=r"step_00000002.*No space left on device.*"
                       r"step_00000001 is untouched"):
        try:
            ckpt.save(2, model, optimizer, {"step": 2})
        except CheckpointException:  # what escaped before
            pytest.fail("CheckpointException escaped")
    monkeypatch.undo()
    assert ckpt.latest() == good and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("tear", ["distcp", "metadata", "trainer_state"])
def test_torn_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, tear):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.save(1, model, optimizer, {"step": 1})
    optimizer.step()
    newest = ckpt.save(2, model, optimizer, {"step": 2})
    if tear == "distcp":
        (shard,) = (tmp_path / "step_00000002").glob("*.distcp")
        shard.write_bytes(shard.read_bytes()[:40])
    elif tear == "metadata":
        (tmp_path / "step_00000002" / ".metadata").write_bytes(b"\x80garbage")
    else:
        (tmp_path / "step_00000002" / "trainer_state.json").write_text("")
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    path, state, _ = ckpt.load_newest(fresh, fresh_opt)
    assert path.endswith("step_00000001") and state["step"] == 1
    assert f"cannot resume from {newest}" in caplog.text
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, first[key]), key


def test_checkpoint_of_another_model_names_both(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, model, optimizer, {"step": 1})
    other = torch.nn.Linear(5, 2)
    with pytest.raises(CheckpointError, match=r"step_00000001: cannot load it into this model "
                                              r"\(Linear, 0.00M parameters\) and optimizer "
                                              r"\(AdamW\)"):
        ckpt.load_newest(other, torch.optim.AdamW(other.parameters()))


def test_final_eval_failing_or_signalled_keeps_the_trained_run(make_cfg, monkeypatch):
    """The last step's checkpoint is written before the final eval: an error there (or a
    stop signal: the guard is still up) loses nothing trained, and a rerun only evaluates."""
    import signal as signal_module

    cfg = make_cfg(*tiny_train_overrides(), "max_steps=2", "do_first_eval=false",
                   "eval_frequency=100")
    plain_evaluate = train_module.evaluate

    def failing(*args, **kwargs):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(train_module, "evaluate", failing)
    with pytest.raises(RuntimeError, match="sampling failed"):
        run(cfg)
    assert (cfg.run_dir / "checkpoints" / "step_00000002" / COMPLETE).exists()

    def signalled(*args, **kwargs):  # SIGTERM arrives mid-eval: the eval still completes
        os.kill(os.getpid(), signal_module.SIGTERM)
        return plain_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", signalled)
    result = run(cfg)  # resumes at the end: no training, the final eval only
    assert result.final_eval["num_examples"] == 80
    assert [r["step"] for r in train_rows(cfg.run_dir) if "train/loss" in r] == [0, 1]


def test_a_second_run_of_the_same_dir_is_refused_and_a_killed_holder_frees_it(make_cfg):
    """A live run holds the directory's OS file lock: a second run is refused at once,
    naming the holder; once the holder is SIGKILLed the kernel has dropped the lock and the
    next run goes on (no stale lock to take over, whatever the lock file holds)."""
    from moedpo.run_dir import HOLDER, LOCK, RunLocked

    cfg = make_cfg(*tiny_train_overrides(), "max_steps=1")
    cfg.run_dir.mkdir(parents=True)
    hold = ("import json, os, socket, sys, time; from filelock import FileLock; "
            f"lock = FileLock({str(cfg.run_dir / LOCK)!r}); lock.acquire(); "
            f"open({str(cfg.run_dir / HOLDER)!r}, 'w').write(json.dumps({{'host': "
            "socket.gethostname(), 'pid': os.getpid(), 'since': time.time()})); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"in use by another run .* pid {holder.pid} since"):
            run(cfg)
        assert not (cfg.run_dir / "checkpoints").exists()  # refused before anything ran
        holder.kill()
        holder.wait()
        run(cfg)  # the kernel dropped the killed holder's lock
    finally:
        holder.kill()
        holder.wait()
    assert not (cfg.run_dir / HOLDER).exists()  # the finished run let go of it


def test_resume_refuses_changes_that_make_another_run_and_records_safe_ones(make_cfg, caplog):
    from moedpo.config import ConfigError

    common = [*tiny_train_overrides(), "max_steps=2", "lr=1e-3"]
    first = make_cfg(*common)
    run(first)
    recorded = (first.run_dir / "config.yaml").read_text()
    for change, shown in ((["lr=5e-4"], "lr: 0.001 -> 0.0005"),
                          (["per_device_train_batch_size=2"],
                           "per_device_train_batch_size: 4 -> 2"),
                          (["model.policy_dtype=bfloat16"],
                           "model.policy_dtype: float32 -> bfloat16")):
        with pytest.raises(ConfigError, match=f"other settings \\({shown}\\).*resume=false"):
            run(make_cfg(*common, *change))
        assert (first.run_dir / "config.yaml").read_text() == recorded  # not misrecorded
    longer = make_cfg(*common, "max_steps=3", "eval_frequency=50")
    with caplog.at_level("INFO", logger="moedpo"):
        run(longer)
    assert "resumed with a changed setting: max_steps: 2 -> 3" in caplog.text
    assert "max_steps: 3" in (first.run_dir / "config.yaml").read_text()
    assert [r["step"] for r in train_rows(first.run_dir) if "train/loss" in r] == [0, 1, 2]


def test_a_torn_newest_checkpoint_does_not_switch_the_settings_check_off(make_cfg, caplog):
    """The newest checkpoint's trainer_state.json emptied: resume falls back to the one
    before, and that one's settings are checked like any other (lr=0.5 was accepted before,
    and config.yaml recorded it); with the run's own settings it resumes from there."""
    from moedpo.config import ConfigError

    common = [*tiny_train_overrides(), "max_steps=4", "lr=1e-3", "checkpoint.save_frequency=2",
              "eval_frequency=50"]
    first = make_cfg(*common)
    run(first)
    (Path(first.checkpoint_dir) / "step_00000004" / "trainer_state.json").write_text("")
    recorded = (first.run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.001 -> 0.5\)"):
        run(make_cfg(*common, "lr=0.5", "max_steps=6"))
    assert (first.run_dir / "config.yaml").read_text() == recorded
    assert "step_00000004: trainer_state.json is unreadable" in caplog.text
    with caplog.at_level("INFO", logger="moedpo"):
        run(make_cfg(*common, "max_steps=6"))
    assert "step_00000002 at step 2" in caplog.text
    steps = [r["step"] for r in train_rows(first.run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 5  # no step twice


def test_a_full_disk_at_the_run_lock_neither_stops_this_run_nor_blocks_a_later_one(
        make_cfg, monkeypatch, caplog):
    """With output_dir full, writing the old lock file raised OSError and left a 0-byte lock
    that refused every later run ("? pid ? since 1970"). The OS lock needs no bytes: the
    holder's record failing to write is a warning, and a 0-byte lock file left behind (by the
    old code) blocks nothing."""
    import errno
    from pathlib import Path as PathClass

    from moedpo.run_dir import HOLDER, LOCK

    cfg = make_cfg(*tiny_train_overrides(), "max_steps=1")
    real = PathClass.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(LOCK):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(PathClass, "write_text", full)
        run(cfg)
    assert "could not record the holder" in caplog.text and "No space left" in caplog.text
    (cfg.run_dir / LOCK).write_text("")  # as the old code left it
    (cfg.run_dir / HOLDER).write_text("")
    run(make_cfg(*tiny_train_overrides(), "max_steps=2"))


def test_max_steps_changed_on_resume_stretches_the_cosine_from_the_resumed_step(make_cfg,
                                                                                caplog):
    """A cosine run of 4 steps resumed with max_steps=8: from the resumed step on, the
    learning rate is the 8-step schedule's (a straight 8-step run's), one info line says
    so; unchanged settings keep the checkpoint's rate exactly."""
    common = [*tiny_train_overrides(), "sched=CosineAnnealing", "sched.warmup_steps=1",
              "sched.min_lr=1e-5", "lr=1e-3", "report_metrics_freq=1", "eval_frequency=50",
              "checkpoint.save_frequency=2"]
    run(make_cfg(*common, "max_steps=8", "exp_name=straight"))
    run(make_cfg(*common, "max_steps=4", "exp_name=resumed"))
    with caplog.at_level("INFO", logger="moedpo"):
        resumed = run(make_cfg(*common, "max_steps=8", "exp_name=resumed"))
    assert "the learning-rate schedule now spans 8 steps" in caplog.text
    lr = {name: {r["step"]: r["train/lr"] for r in train_rows(path) if "train/lr" in r}
          for name, path in (("straight", resumed.run_dir.parent / "straight"),
                             ("resumed", resumed.run_dir))}
    assert sorted(lr["resumed"]) == list(range(8))
    for step in range(4, 8):
        assert lr["resumed"][step] == pytest.approx(lr["straight"][step], rel=1e-12), step
    assert lr["resumed"][3] != pytest.approx(lr["straight"][3])  # the 4-step curve before
