"""The project's declared dependencies, as environments are built and reported from them.

    deps.py reqs [--torch SPEC] [--add SPEC ...]   requirement lines: pyproject.toml's
                                                   dependencies, torch's spec replaced
    deps.py pins REPORT.json                       name==version for each package of a
                                                   `pip install --dry-run --report` (sorted)
    deps.py show [--add NAME ...]                  the installed version of each direct
                                                   dependency in the running interpreter

`reqs` keeps one list (pyproject.toml) for the package, the test venv and the torch_xla venv;
`pins` keys a cached environment on what the declared ranges resolve to today, so a cache
built from older releases is rebuilt as soon as a new one is published; `show` is the line CI
prints at the start of each run. Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import json
import re
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
    args = parser.parse_args(argv)
    if args.command == "reqs":
        print("\n".join(requirements(args.torch, args.add)))
    elif args.command == "pins":
        print("\n".join(pins(json.loads(args.report.read_text()))))
    else:
        names = [project_name(s) for s in declared()] + args.add
        versions = ", ".join(f"{n} {v}" for n, v in installed(names))
        print(f"dependencies ({sys.executable}): {versions}")


if __name__ == "__main__":
    main()
