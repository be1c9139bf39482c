"""The deployment files: shell that parses, Dockerfiles that keep the image's torch, and every
moedpo command line in them and in the README's deployment docs a valid configuration."""

import json
import re
import shlex
import subprocess

import pytest

from conftest import ROOT, compose_cfg
from moedpo.validate import validate

SHELL_SCRIPTS = ["docker/tpu/build_and_push_image.sh", "deploy/slurm.sbatch", "scripts/xla_env.sh",
                 ".ci/run"]
DOCKERFILES = ["docker/tpu/Dockerfile", "docker/gpu/Dockerfile"]
INSTRUCTIONS = {"FROM", "ARG", "WORKDIR", "COPY", "RUN", "ENV", "CMD", "ENTRYPOINT", "LABEL",
                "USER", "EXPOSE"}


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_parses(script):
    done = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def dockerfile_instructions(path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / path).read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("path", DOCKERFILES)
def test_dockerfile_well_formed(path):
    instructions = dockerfile_instructions(path)
    assert {name for name, _ in instructions} <= INSTRUCTIONS
    assert [name for name, _ in instructions if name != "ARG"][0] == "FROM"
    runs = " ".join(arg for name, arg in instructions if name == "RUN")
    if "tpu" in path:  # pip must not swap torch_xla's torch for moedpo's CPU/GPU pin
        assert "--no-deps -e ." in runs and "torch==" not in runs
    else:
        assert "torch==2.13.0" in runs


def documented_commands() -> list[list[str]]:
    """Overrides of every `run_dpo_no_trainer.py` line of the deployment docs and files."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Deployment"):readme.index("## Benchmarks")]
    section = section.replace("\\\n", " ")
    found = []
    for match in re.finditer(r"run_dpo_no_trainer\.py([^\"\n]*)", section):
        found.append(shlex.split(match.group(1)))
    for path in DOCKERFILES:
        for name, arg in dockerfile_instructions(path):
            if name == "CMD" and "run_dpo_no_trainer.py" in arg:
                words = json.loads(arg)  # exec form: a JSON list
                found.append(words[words.index("run_dpo_no_trainer.py") + 1:])
    return found


def test_documented_command_lines_are_valid_configs():
    commands = documented_commands()
    assert len(commands) >= 4
    for overrides in commands:
        validate(compose_cfg(*overrides))
