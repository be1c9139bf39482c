#!/usr/bin/env bash
# Create (or reuse) the torch_xla environment that tests the TPU path on the CPU.
#
# It is the TPU image in a venv: the RUN steps of docker/tpu/Dockerfile (torch 2.9, torch_xla
# 2.9 with libtpu, then moedpo with its dependencies from pyproject.toml), run as written, so
# a TPU image that cannot install fails CI without a Docker daemon. ~7 GB, ~3 minutes to build.
# It is cached outside the clone, keyed on what those steps resolve to TODAY (`pip install
# --dry-run --report`, ~30 s): when a dependency publishes a release, the key changes and the
# venv is rebuilt with it, so CI tests what a new user installs, never what an older cache
# holds. A reused venv gets the checkout's moedpo reinstalled (no dependencies, ~15 s). Offline,
# the newest cached venv is reused with a warning. Older venvs are removed after a build.
# Prints the venv's python on stdout; progress and the resolved versions go to stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/moedpo"
DEPS=("$PYTHON" "$ROOT/scripts/deps.py")
DOCKERFILE="$ROOT/docker/tpu/Dockerfile"
OFFLINE=0
REPORT=""
CONTEXT="$(mktemp -d)"  # the image's `COPY . .`: a clean copy of the source (deps.py context)
trap 'rm -rf "$CONTEXT" "$REPORT"' EXIT
mapfile -t STEPS < <("${DEPS[@]}" steps "$DOCKERFILE")
mapfile -t REQS < <("${DEPS[@]}" image-reqs "$DOCKERFILE"; echo "pytest>=8")
if [[ -n "${MOEDPO_XLA_ENV:-}" ]]; then  # a venv the user manages: no key, no pruning
  ENV_DIR="$MOEDPO_XLA_ENV"
  PINS=("${REQS[@]}")
else
  REPORT="$(mktemp)"
  echo "xla_env: resolving today's versions of ${#REQS[@]} requirements" >&2
  # From the root, as the image runs them after `COPY . .` (its `.[gcs]` is the checkout).
  if (cd "$ROOT" && "$PYTHON" -m pip install -q --dry-run --ignore-installed \
        --report "$REPORT" "${REQS[@]}" >/dev/null 2>&1); then
    # moedpo itself is left out of the key: a reused venv gets the checkout's copy below.
    mapfile -t PINS < <("${DEPS[@]}" pins "$REPORT" | grep -v '^moedpo==')
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
         "which may hold older releases than a new install gets, and an older moedpo" \
         "(tests run the checkout through PYTHONPATH)" >&2
    PINS=()
    OFFLINE=1
  fi
fi
PY="$ENV_DIR/bin/python"

FRESH=0

if [[ ! -f "$ENV_DIR/.complete" ]]; then
  echo "xla_env: building $ENV_DIR from the RUN steps of $DOCKERFILE (~7 GB, ~3 min)" >&2
  rm -rf "$ENV_DIR"
  "$PYTHON" -m venv "$ENV_DIR"
  "$PY" -m pip install -q --upgrade pip >&2
  "${DEPS[@]}" context "$CONTEXT"
  for step in "${STEPS[@]}"; do
    echo "xla_env: RUN $step" >&2
    (cd "$CONTEXT" && PATH="$ENV_DIR/bin:$PATH" PIP_QUIET=1 bash -euo pipefail -c "$step") >&2
  done
  "$PY" -m pip install -q "pytest>=8" >&2
  (cd / && "$PY" -c "import torch_xla, transformers, hydra, peft, moedpo") >&2
  printf '%s\n' "${PINS[@]}" > "$ENV_DIR/resolved.txt"
  touch "$ENV_DIR/.complete"
  FRESH=1
  if [[ -z "${MOEDPO_XLA_ENV:-}" ]]; then  # ~7 GB each: keep only the one now in use
    for old in "$CACHE"/xla-env-*; do
      if [[ "$old" != "$ENV_DIR" ]]; then
        echo "xla_env: removing the outdated $old" >&2
        rm -rf "$old"
      fi
    done
  fi
fi
if [[ "$FRESH" == 0 && "$OFFLINE" == 0 ]] && ! ("${DEPS[@]}" context "$CONTEXT" &&
    "$PY" -m pip install -q --no-deps --force-reinstall "$CONTEXT" >&2); then
  echo "xla_env: WARNING: could not reinstall the checkout's moedpo into $ENV_DIR; its" \
       "installed copy may be older (tests run the checkout through PYTHONPATH)" >&2
fi
"$PY" "$ROOT/scripts/deps.py" show --add torch-xla --add kernels --add pytest >&2
echo "$PY"
