"""output_dir as a URL: every file of the run lands at the URL (fsspec's in-process
memory:// filesystem stands in for gs://), nothing in a local `gs:`-like folder, and a run
resumed on another machine (another local mirror) continues from what is at the URL."""

import json
import os
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from conftest import tiny_train_overrides
from moedpo.trainer import run


@pytest.fixture
def bucket():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/bucket", recursive=True) if fs.exists("/bucket") else None


def test_url_output_dir_keeps_every_file_at_the_url_and_resumes_elsewhere(
        make_cfg, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "vm1"))
    common = [*tiny_train_overrides(), "output_dir=memory://bucket/runs", "exp_name=demo",
              "reference.precompute=true"]
    run(make_cfg(*common, "max_steps=2"))
    files = {p.removeprefix("/bucket/runs/demo/") for p in bucket.find("/bucket/runs/demo")}
    assert {"metrics.jsonl", "config.yaml"} <= files
    assert any(f.startswith("tensorboard/") for f in files)
    assert any(f.startswith("checkpoints/step_00000002/") for f in files)
    assert bucket.find("/bucket/runs/reference_cache")  # the default cache dir follows it
    assert not any("memory:" in str(p) for p in tmp_path.rglob("*"))  # no local URL folder
    # Another machine: an empty local mirror; the run resumes from what is at the URL.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "vm2"))
    run(make_cfg(*common, "max_steps=3"))
    rows = [json.loads(line) for line in
            bucket.cat_file("/bucket/runs/demo/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [0, 1, 2]
    assert bucket.exists("/bucket/runs/demo/checkpoints/step_00000003/COMPLETE")


def test_file_url_is_a_local_path(make_cfg, tmp_path):
    cfg = make_cfg(*tiny_train_overrides(), "max_steps=1", f"output_dir=file://{tmp_path}/out")
    assert cfg.run_dir == Path(f"{tmp_path}/out/demo") and cfg.run_url is None
    run(cfg)
    assert (tmp_path / "out" / "demo" / "metrics.jsonl").exists()
    assert (tmp_path / "out" / "demo" / "checkpoints").is_dir()
    assert not (Path(os.getcwd()) / "file:").exists()


class FlakyMemory(MemoryFileSystem):
    """memory:// whose uploads (put_file) fail while `failures` lasts, as a bucket's
    transient errors do; everything else (checkpoints written by DCP) works."""

    protocol = "flaky"
    failures = 0
    sent: list[str] = []  # what went up, in order

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def put_file(self, lpath, rpath, *args, **kwargs):
        if FlakyMemory.failures > 0:
            FlakyMemory.failures -= 1
            raise OSError(503, "Service Unavailable (injected)")
        FlakyMemory.sent.append(str(rpath).rsplit("/", 1)[-1])
        return super().put_file(lpath, rpath, *args, **kwargs)


@pytest.mark.parametrize("failures", [3, 7], ids=["retried", "next-publish"])
def test_transient_upload_errors_neither_stop_the_run_nor_lose_files(make_cfg, bucket, tmp_path,
                                                                      monkeypatch, caplog,
                                                                      failures):
    """12 steps to a bucket whose first uploads fail: 3 failures are absorbed by the retries;
    7 make one file fail all 5 tries (a warning, sent again at the next publish). The run
    finishes, the bucket ends equal to the local run dir, and a publish sends only what
    changed (far fewer uploads than files x publishes)."""
    fsspec.register_implementation("flaky", FlakyMemory, clobber=True)
    FlakyMemory.failures, FlakyMemory.sent = failures, []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "vm"))
    cfg = make_cfg(*tiny_train_overrides(), "output_dir=flaky://bucket/runs", "exp_name=demo",
                   "max_steps=12", "eval_frequency=3", "checkpoint.save_frequency=6",
                   "loggers=[]")
    result = run(cfg)
    assert not result.preempted and FlakyMemory.failures == 0
    assert ("could not upload" in caplog.text) == (failures > 5)
    local = {p.relative_to(cfg.run_dir).as_posix(): p.read_bytes()
             for p in cfg.run_dir.rglob("*") if p.is_file() and p.name != ".moedpo.lock"}
    remote = {p.removeprefix("/bucket/runs/demo/"): bucket.cat_file(p)
              for p in bucket.find("/bucket/runs/demo") if "/checkpoints/" not in p}
    assert local == remote
    # Only what changed: config.yaml once, metrics.jsonl at each publish after it grew.
    assert FlakyMemory.sent.count("config.yaml") == 1
    assert FlakyMemory.sent.count("metrics.jsonl") > 3
