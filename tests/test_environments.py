"""The environments CI builds: one declared list (pyproject.toml), cached venvs keyed on what
it resolves to today (scripts/deps.py, scripts/xla_env.sh), versions printed."""

import os
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import deps  # noqa: E402


def test_requirements_are_pyprojects_with_torch_swapped():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = deps.requirements(torch="torch==2.9.0", add=["torch-xla==2.9.0"])
    assert reqs[-1] == "torch-xla==2.9.0"
    assert [r for r in reqs if deps.project_name(r) == "torch"] == ["torch==2.9.0"]
    # Every other declared requirement, peft included (the old hand-copied list lacked it).
    assert [r for r in reqs[:-1] if deps.project_name(r) != "torch"] == \
        [r for r in declared if deps.project_name(r) != "torch"]
    assert "peft" in {deps.project_name(r) for r in reqs}


def report(*packages: tuple[str, str]) -> dict:
    return {"install": [{"metadata": {"name": n, "version": v}} for n, v in packages]}


def test_pins_follow_what_pip_resolved_so_a_new_release_is_a_new_key():
    today = deps.pins(report(("Transformers", "5.25.0"), ("torch", "2.9.0"),
                             ("typing_extensions", "4.16.0")))
    assert today == ["torch==2.9.0", "transformers==5.25.0", "typing-extensions==4.16.0"]
    # Order of the report does not matter; a changed version does.
    assert deps.pins(report(("typing_extensions", "4.16.0"), ("torch", "2.9.0"),
                            ("transformers", "5.25.0"))) == today
    assert deps.pins(report(("transformers", "5.26.0"), ("torch", "2.9.0"),
                            ("typing_extensions", "4.16.0"))) != today


def test_show_prints_each_direct_dependency_with_its_version():
    done = subprocess.run([sys.executable, str(ROOT / "scripts/deps.py"), "show",
                           "--add", "no-such-package-xyz"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    import transformers

    assert f"transformers {transformers.__version__}" in done.stdout
    assert "no-such-package-xyz not installed" in done.stdout


def xla_env(tmp_path, **extra) -> subprocess.CompletedProcess:
    # No package index at all: resolution fails at once, without a network.
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": "", **extra}
    env.pop("MOEDPO_XLA_ENV", None)
    return subprocess.run(["bash", str(ROOT / "scripts/xla_env.sh")], env=env,
                          capture_output=True, text=True, timeout=120)


def test_xla_env_offline_without_a_cache_says_so(tmp_path):
    done = xla_env(tmp_path)
    assert done.returncode == 1
    assert "cannot resolve the requirements" in done.stderr
    assert not (tmp_path / "moedpo").exists() or not list((tmp_path / "moedpo").iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="symlinked venv python")
def test_xla_env_offline_reuses_the_newest_cached_venv_with_a_warning(tmp_path):
    for name in ("xla-env-old", "xla-env-new"):
        folder = tmp_path / "moedpo" / name
        (folder / "bin").mkdir(parents=True)
        (folder / "bin" / "python").symlink_to(sys.executable)
        (folder / ".complete").touch()
        os.utime(folder / ".complete", (1, 1) if name.endswith("old") else None)
    done = xla_env(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "moedpo/xla-env-new/bin/python")
    assert "WARNING: cannot resolve today's versions" in done.stderr
    assert "dependencies (" in done.stderr and "transformers " in done.stderr


def test_wheel_ships_license_types_and_the_one_version(tmp_path):
    """The version is written once (moedpo.__version__): the wheel's metadata, `moedpo
    --version` and the package agree; the wheel carries LICENSE and py.typed."""
    import importlib.util
    import zipfile

    import moedpo

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here: no wheel can be built offline")
    source = tmp_path / "source"  # a clean copy: pip builds in place, leaving build/ behind
    deps.copy_context(source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(source)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("moedpo-*.whl")
    assert wheel.name.startswith(f"moedpo-{moedpo.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "moedpo/py.typed" in names
    # Both entry points, so the seed's lines run from an installed package too.
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "moedpo = moedpo.cli:main" in scripts
    assert "run_dpo_no_trainer = moedpo.cli:seed_main" in scripts
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    done = subprocess.run([sys.executable, "-m", "moedpo", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == f"moedpo {moedpo.__version__}"


def test_context_copies_the_source_an_image_copies_and_no_leftovers(tmp_path):
    """CI's venvs build the package from this copy (the image's `COPY . .`): the sources and
    a new file not yet committed are there; the venv, build leftovers and caches are not."""
    import shutil

    had_build = (ROOT / "build").exists()
    (ROOT / "build" / "lib" / "moedpo").mkdir(parents=True, exist_ok=True)
    stale = ROOT / "build" / "lib" / "moedpo" / "deleted_module.py"
    stale.write_text("")
    untracked = ROOT / "scripts" / "_context_probe.txt"
    untracked.write_text("new")
    try:
        count = deps.copy_context(tmp_path)
    finally:
        stale.unlink()
        untracked.unlink()
        if not had_build:
            shutil.rmtree(ROOT / "build")
    assert (tmp_path / "pyproject.toml").is_file() and (tmp_path / "moedpo/__init__.py").is_file()
    assert (tmp_path / "scripts/_context_probe.txt").read_text() == "new"
    assert not (tmp_path / ".venv").exists() and not (tmp_path / "build").exists()
    assert not list(tmp_path.rglob("__pycache__"))
    assert count == sum(1 for p in tmp_path.rglob("*") if p.is_file())
