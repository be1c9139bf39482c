#!/usr/bin/env bash
# Create (or reuse) the torch_xla environment that tests the TPU path on the CPU.
#
# torch_xla 2.9.0 pins torch 2.9.0, which cannot live beside the project's torch 2.13.0, so
# it gets a venv of its own (~7 GB, ~3 minutes to build). It is cached outside the clone,
# keyed by this script's requirement list, so CI and later sessions reuse it.
# Prints the venv's python on stdout; progress goes to stderr.
set -euo pipefail

REQS=(
  "torch==2.9.0" "torch-xla==2.9.0"
  "transformers>=5.23,<6" "tokenizers>=0.22" "safetensors>=0.5" "datasets>=4"
  "hydra-core==1.3.*" "omegaconf>=2.3" "fsspec" "tqdm>=4.66" "numpy" "tensorboard>=2.18"
  "pytest>=8"
)
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
KEY="$(printf '%s\n' "${REQS[@]}" | sha256sum | cut -c1-12)"
ENV_DIR="${MOEDPO_XLA_ENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moedpo/xla-env-$KEY}"
PY="$ENV_DIR/bin/python"

if [[ ! -f "$ENV_DIR/.complete" ]]; then
  echo "xla_env: building $ENV_DIR (torch 2.9.0 + torch_xla 2.9.0, ~7 GB, ~3 min)" >&2
  rm -rf "$ENV_DIR"
  "$PYTHON" -m venv "$ENV_DIR"
  "$PY" -m pip install -q --upgrade pip >&2
  # torch and torch_xla first, then the rest constrained to that torch, so nothing
  # later can swap it for another build.
  "$PY" -m pip install -q "${REQS[0]}" "${REQS[1]}" >&2
  "$PY" -m pip install -q "${REQS[@]:2}" "${REQS[0]}" >&2
  "$PY" -c "import torch_xla, transformers, hydra" >&2
  touch "$ENV_DIR/.complete"
fi
echo "$PY"
