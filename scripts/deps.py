"""The project's declared dependencies, as environments are built and reported from them.

    deps.py reqs [--torch SPEC] [--add SPEC ...]   requirement lines: pyproject.toml's
                                                   dependencies, torch's spec replaced
    deps.py pins REPORT.json                       name==version for each package of a
                                                   `pip install --dry-run --report` (sorted)
    deps.py show [--add NAME ...]                  the installed version of each direct
                                                   dependency in the running interpreter
    deps.py lowest NAME ...                        NAME==LOWER for the lower bound pyproject
                                                   declares for each (the oldest supported end)
    deps.py steps DOCKERFILE                       the image's RUN commands, one per line
    deps.py image-reqs DOCKERFILE                  what the image's `pip install`s ask for
    deps.py context DEST                           copy the checkout's source (git's tracked
                                                   and unignored files) to DEST, as `COPY . .`

`reqs` keeps one list (pyproject.toml) for the package, the test venv and the torch_xla venv;
`pins` keys a cached environment on what the declared ranges resolve to today, so a cache
built from older releases is rebuilt as soon as a new one is published; `show` is the line CI
prints at the start of each run; `lowest` names the oldest end CI installs; `steps` and
`image-reqs` let CI build a venv from a Dockerfile's own install steps (scripts/xla_env.sh,
scripts/install_check.sh), so an image whose steps cannot install fails CI without a Docker
daemon. Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def project_name(spec: str) -> str:
    """The distribution name a requirement line starts with (PEP 508), normalised (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if not match:
        raise SystemExit(f"deps.py: cannot read a package name from {spec!r} in {PYPROJECT}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def declared(pyproject: Path = PYPROJECT) -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def requirements(torch: str | None = None, add: list[str] | None = None,
                 pyproject: Path = PYPROJECT) -> list[str]:
    specs = declared(pyproject)
    if torch:
        specs = [torch if project_name(s) == "torch" else s for s in specs]
    return [*specs, *(add or [])]


def pins(report: dict) -> list[str]:
    """`name==version` of every package a pip installation report would install."""
    found = {(project_name(item["metadata"]["name"]), item["metadata"]["version"])
             for item in report["install"]}
    return [f"{name}=={version}" for name, version in sorted(found)]


def installed(names: list[str]) -> list[tuple[str, str]]:
    rows = []
    for name in names:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return rows


def lowest(name: str, pyproject: Path = PYPROJECT) -> str:
    """`name==X` for the `>=X` that pyproject.toml declares for `name`."""
    wanted = project_name(name)
    for spec in declared(pyproject):
        if project_name(spec) == wanted:
            found = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
            if not found:
                raise SystemExit(f"deps.py: {spec!r} in {pyproject} has no lower bound")
            return f"{wanted}=={found.group(1)}"
    raise SystemExit(f"deps.py: {name} is not a dependency in {pyproject}")


def dockerfile_steps(dockerfile: Path) -> list[str]:
    """The RUN commands of a Dockerfile (shell form), continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    steps = []
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if len(words) == 2 and words[0].upper() == "RUN":
            if words[1].lstrip().startswith("["):
                raise SystemExit(f"deps.py: {dockerfile}: write RUN in shell form, not exec form")
            steps.append(" ".join(words[1].split()))
    return steps


def image_requirements(dockerfile: Path) -> list[str]:
    """Every requirement the image's `pip install` commands name (options dropped), in order:
    the input of a dry-run that says what the image would install today."""
    reqs = []
    for step in dockerfile_steps(dockerfile):
        for command in re.split(r"&&|;", step):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                args = words[words.index("install") + 1:]
                reqs += [a for a in args if not a.startswith("-")]
    return reqs


def copy_context(dest: Path, root: Path = PYPROJECT.parent) -> int:
    """Copy what an image's `COPY . .` takes (.dockerignore keeps the same files out that git
    ignores) into dest, so the image's steps build the package from a clean tree: pip builds a
    local folder in place, and a stale build/ there could ship modules deleted since."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], check=True, capture_output=True).stdout
    count = 0
    for name in filter(None, listed.decode().split("\0")):
        source = root / name
        if source.is_file():  # a tracked file deleted in the work tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
            count += 1
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deps.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    reqs = sub.add_parser("reqs")
    reqs.add_argument("--torch")
    reqs.add_argument("--add", action="append", default=[])
    pin = sub.add_parser("pins")
    pin.add_argument("report", type=Path)
    show = sub.add_parser("show")
    show.add_argument("--add", action="append", default=[])
    low = sub.add_parser("lowest")
    low.add_argument("names", nargs="+")
    for name in ("steps", "image-reqs"):
        sub.add_parser(name).add_argument("dockerfile", type=Path)
    sub.add_parser("context").add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "reqs":
        print("\n".join(requirements(args.torch, args.add)))
    elif args.command == "lowest":
        print("\n".join(lowest(name) for name in args.names))
    elif args.command == "steps":
        print("\n".join(dockerfile_steps(args.dockerfile)))
    elif args.command == "image-reqs":
        print("\n".join(image_requirements(args.dockerfile)))
    elif args.command == "context":
        print(f"deps.py: copied {copy_context(args.dest)} files to {args.dest}", file=sys.stderr)
    elif args.command == "pins":
        print("\n".join(pins(json.loads(args.report.read_text()))))
    else:
        names = [project_name(s) for s in declared()] + args.add
        versions = ", ".join(f"{n} {v}" for n, v in installed(names))
        print(f"dependencies ({sys.executable}): {versions}")


if __name__ == "__main__":
    main()
