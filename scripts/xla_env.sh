#!/usr/bin/env bash
# Create (or reuse) the torch_xla environment that tests the TPU path on the CPU.
#
# torch_xla 2.9.0 pins torch 2.9.0, which cannot live beside the project's test torch, so it
# gets a venv of its own (~7 GB, ~3 minutes to build) with the project's other dependencies
# from pyproject.toml (scripts/deps.py). It is cached outside the clone, keyed on what those
# requirements resolve to TODAY (`pip install --dry-run --report`, ~30 s): when a dependency
# publishes a release, the key changes and the venv is rebuilt with it, so CI tests what a new
# user installs, never what an older cache holds. Offline, the newest cached venv is reused
# with a warning. Older venvs are removed after a build.
# Prints the venv's python on stdout; progress and the resolved versions go to stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/moedpo"
DEPS=("$PYTHON" "$ROOT/scripts/deps.py")
mapfile -t REQS < <("${DEPS[@]}" reqs --torch "torch==2.9.0" --add "torch-xla==2.9.0" \
                      --add "pytest>=8")

if [[ -n "${MOEDPO_XLA_ENV:-}" ]]; then  # a venv the user manages: no key, no pruning
  ENV_DIR="$MOEDPO_XLA_ENV"
  PINS=("${REQS[@]}")
else
  REPORT="$(mktemp)"
  trap 'rm -f "$REPORT"' EXIT
  echo "xla_env: resolving today's versions of ${#REQS[@]} requirements" >&2
  if "$PYTHON" -m pip install -q --dry-run --ignore-installed --report "$REPORT" \
       "${REQS[@]}" >/dev/null 2>&1; then
    mapfile -t PINS < <("${DEPS[@]}" pins "$REPORT")
    KEY="$( (printf '%s\n' "${PINS[@]}"; "$PYTHON" -c 'import sys; print(sys.version)') |
            sha256sum | cut -c1-12)"
    ENV_DIR="$CACHE/xla-env-$KEY"
  else
    ENV_DIR="$( (ls -dt "$CACHE"/xla-env-*/.complete 2>/dev/null || true) | head -1 |
               xargs -r dirname)"
    if [[ -z "$ENV_DIR" ]]; then
      echo "xla_env: cannot resolve the requirements (is the package index reachable?) and" \
           "no cached environment exists under $CACHE" >&2
      exit 1
    fi
    echo "xla_env: WARNING: cannot resolve today's versions (offline?); reusing $ENV_DIR," \
         "which may hold older releases than a new install gets" >&2
    PINS=()
  fi
fi
PY="$ENV_DIR/bin/python"

if [[ ! -f "$ENV_DIR/.complete" ]]; then
  echo "xla_env: building $ENV_DIR (torch 2.9.0 + torch_xla 2.9.0, ~7 GB, ~3 min)" >&2
  rm -rf "$ENV_DIR"
  "$PYTHON" -m venv "$ENV_DIR"
  "$PY" -m pip install -q --upgrade pip >&2
  # torch and torch_xla first, then the rest pinned to exactly what was resolved (the key),
  # so nothing later can swap torch for another build.
  "$PY" -m pip install -q "torch==2.9.0" "torch-xla==2.9.0" >&2
  "$PY" -m pip install -q "${PINS[@]}" >&2
  "$PY" -c "import torch_xla, transformers, hydra" >&2
  printf '%s\n' "${PINS[@]}" > "$ENV_DIR/resolved.txt"
  touch "$ENV_DIR/.complete"
  if [[ -z "${MOEDPO_XLA_ENV:-}" ]]; then  # ~7 GB each: keep only the one now in use
    for old in "$CACHE"/xla-env-*; do
      if [[ "$old" != "$ENV_DIR" ]]; then
        echo "xla_env: removing the outdated $old" >&2
        rm -rf "$old"
      fi
    done
  fi
fi
"$PY" "$ROOT/scripts/deps.py" show --add torch-xla --add kernels --add pytest >&2
echo "$PY"
