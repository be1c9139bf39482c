"""Every command line of the seed recipe (../shared/seed/README.md) runs in moedpo.

The model is swapped for a tiny local one, the gs:// checkpoint for a local one, the hub
dataset for a local copy in the hub's layout, and max_steps made small; every other override
is kept as the recipe writes it.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from moedpo.checkpoint import save_weights
from moedpo.config import ModelConfig
from moedpo.models.load import build_models

ROOT = Path(__file__).resolve().parents[1]
SEED_README = ROOT.parent / "shared" / "seed" / "README.md"


def seed_commands() -> list[str]:
    if not SEED_README.is_file():
        if os.environ.get("CI"):  # CI lays shared/ beside the clone: missing is a failure
            pytest.fail(f"{SEED_README} not found, though CI puts shared/ beside the clone")
        pytest.skip(f"{SEED_README} not found (CI clones main with shared/ beside it)")
    lines = re.findall(r"^python run_dpo_no_trainer\.py(.*)$", SEED_README.read_text(), re.M)
    assert len(lines) >= 5, "the seed recipe should have at least 5 command lines"
    return [line.strip() for line in lines]


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model, _ = build_models(ModelConfig(config_path="tiny-mixtral.json",
                                        policy_dtype="float32"), seed=42)
    save_weights(model, str(folder / "500"))
    return folder


def localise(args: list[str], neox: Path, hh: Path, ckpt: Path, out: Path) -> list[str]:
    has_config_path = any(a.startswith("model.config_path=") for a in args)
    swapped = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "model.config_path":
            arg = "model.config_path=tiny-mixtral.json"
        elif key == "model.name_or_path" and not has_config_path:
            arg = f"model.name_or_path={neox}"
        elif key == "checkpoint_manager_path":
            arg = f"checkpoint_manager_path={ckpt}"
        elif key == "max_steps":
            continue
        swapped.append(arg)
    extra = [f"dataset_dir.hh={hh}", "max_steps=2", f"output_dir={out}"]
    if any(a.startswith("+experiment=") for a in args):
        extra.append(f"model.name_or_path={neox}")
    return swapped + extra


@pytest.mark.parametrize("index", range(5))
def test_seed_command_runs(index, tiny_neox_dir, hh_dir, local_checkpoint, tmp_path):
    commands = seed_commands()
    if index >= len(commands):
        pytest.skip("fewer seed commands")
    args = localise(shlex.split(commands[index]), tiny_neox_dir, hh_dir, local_checkpoint,
                    tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run([sys.executable, "run_dpo_no_trainer.py", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "moe_trial"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [0, 1]
    assert "eval/loss" in rows[-1] and rows[-1]["step"] == 2
    config = OmegaConf.load(run_dir / "config.yaml")
    for arg in args:  # every override reached the resolved config with its value
        key, _, value = arg.partition("=")
        if not key.startswith("+"):
            assert OmegaConf.select(config, key) == yaml.safe_load(value), arg
    if "capacity_factor" in commands[index]:
        assert "MoE experts implementation: dropped" in result.stderr + result.stdout
    if "checkpoint_manager_path" in commands[index]:
        assert "restored weights of policy and reference" in result.stderr + result.stdout
