"""The deployment files: shell that parses, Dockerfiles that keep the image's torch, and every
moedpo command line in them, in the README's recipes and in the deployment docs a valid
configuration."""

import json
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conftest import ROOT, compose_cfg
from moedpo.validate import validate

sys.path.insert(0, str(ROOT / "scripts"))
import deps  # noqa: E402

SHELL_SCRIPTS = ["docker/tpu/build_and_push_image.sh", "deploy/slurm.sbatch", "scripts/xla_env.sh",
                 "scripts/install_check.sh", ".ci/run"]
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


def image_pin(path, name: str) -> Version:
    """The version the image's `pip install name==X` names (its only requirement for name)."""
    (spec,) = [r for r in deps.image_requirements(ROOT / path)
               if not r.startswith(".") and deps.project_name(r) == name]
    return Version(spec.split("==")[1])


def image_torch(path) -> Version:
    return image_pin(path, "torch")


@pytest.mark.parametrize("path", DOCKERFILES)
def test_image_can_install_the_package(path):
    """The reasons the old TPU image could not build, each a rule: a base whose Python the
    package accepts, a torch inside the package's range installed first, and the package with
    its dependencies (no `--no-deps` and a hand-copied list that drifts)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (base,) = [arg for name, arg in dockerfile_instructions(path) if name == "FROM"]
    python = re.fullmatch(r"python:(\d+\.\d+)[-\w.]*", base)
    assert python, f"{path}: FROM {base} is not an official python image"
    assert Version(python.group(1)) in SpecifierSet(project["requires-python"])
    (torch_range,) = [d for d in project["dependencies"] if deps.project_name(d) == "torch"]
    assert image_torch(path) in SpecifierSet(torch_range.removeprefix("torch"))
    steps = deps.dockerfile_steps(ROOT / path)
    assert "torch==" in steps[0] and "--no-deps" not in " ".join(steps)
    assert deps.image_requirements(ROOT / path)[-1].startswith(".[")  # the package, not -e


def test_images_use_the_two_torch_releases_ci_tests():
    """The TPU image's torch is the one its torch_xla needs (the oldest end of the range);
    the GPU image's is the one `make test` installs (the newest end)."""
    assert image_pin("docker/tpu/Dockerfile", "torch-xla") == image_torch("docker/tpu/Dockerfile")
    assert Version(deps.lowest("torch").split("==")[1]) == image_torch("docker/tpu/Dockerfile")
    pin = re.search(r"^TORCH_PIN \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert pin and Version(pin.group(1)) == image_torch("docker/gpu/Dockerfile")


def test_dockerfile_steps_join_continuations_and_keep_order(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:3.11-slim\n# RUN pip install not-a-step\n"
                          "RUN pip install --no-cache-dir torch==2.9.0 \\\n"
                          "    'torch_xla[tpu]==2.9.0' && echo done\nCOPY . .\n"
                          "run pip install -q '.[gcs]'\n")
    assert deps.dockerfile_steps(dockerfile) == [
        "pip install --no-cache-dir torch==2.9.0 'torch_xla[tpu]==2.9.0' && echo done",
        "pip install -q '.[gcs]'"]
    assert deps.image_requirements(dockerfile) == ["torch==2.9.0", "torch_xla[tpu]==2.9.0",
                                                   ".[gcs]"]
    dockerfile.write_text('FROM python:3.11-slim\nRUN ["pip", "install", "torch"]\n')
    with pytest.raises(SystemExit, match="shell form"):
        deps.dockerfile_steps(dockerfile)


def documented_commands() -> list[tuple[int, list[str]]]:
    """(processes, overrides) of every training command line of the README's recipes, the
    deployment docs and the images: `run_dpo_no_trainer.py` and `moedpo train` lines, with
    torchrun's --nproc_per_node as the process count."""
    readme = (ROOT / "README.md").read_text()
    scaling = (ROOT / "docs" / "scaling.md").read_text()
    text = "\n".join(re.findall(r"^```bash\n(.*?)^```", readme
                                 + scaling[scaling.index("## Deployment"):], re.M | re.S))
    found = []
    for match in re.finditer(r"(?:run_dpo_no_trainer\.py|moedpo train)((?:\\\n|[^\"\n])*)",
                             text):
        line = text[text.rfind("\n", 0, match.start()) + 1:match.start()]
        nproc = re.search(r"--nproc_per_node (\d+)", line)
        found.append((int(nproc.group(1)) if nproc else 1,
                      shlex.split(match.group(1).replace("\\\n", " "))))
    # Slurm: deploy/slurm.sbatch starts 8 processes per node (its --gpus-per-node).
    blocks = "\n".join(re.findall(r"^```bash\n(.*?)^```", scaling, re.M | re.S))
    for match in re.finditer(r"sbatch --nodes (\d+) deploy/slurm\.sbatch((?:\\\n|[^\"\n])*)",
                             blocks):
        found.append((8 * int(match.group(1)), shlex.split(match.group(2).replace("\\\n", " "))))
    for path in DOCKERFILES:
        for name, arg in dockerfile_instructions(path):
            if name == "CMD":
                words = json.loads(arg)  # exec form: a JSON list
                (entry,) = [w for w in words if w.startswith("run_dpo_no_trainer")]
                found.append((1, words[words.index(entry) + 1:]))
    return found


def test_documented_command_lines_are_valid_configs():
    commands = documented_commands()
    assert len(commands) >= 9
    assert any("parallel.replicate=2" in overrides for _, overrides in commands)
    for processes, overrides in commands:
        with pytest.MonkeyPatch.context() as env:  # validate reads torchrun's WORLD_SIZE
            env.setenv("WORLD_SIZE", str(processes))
            validate(compose_cfg(*overrides))
