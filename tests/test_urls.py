"""output_dir as a URL: every file of the run lands at the URL (fsspec's in-process
memory:// filesystem stands in for gs://), nothing in a local `gs:`-like folder, and a run
resumed on another machine (another local mirror) continues from what is at the URL."""

import json
import os
from pathlib import Path

import fsspec
import pytest

from conftest import tiny_train_overrides
from moedpo.train import run


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
