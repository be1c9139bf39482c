#!/usr/bin/env bash
# What a user gets from `pip install moedpo`, checked from outside the checkout.
#
#   bash scripts/install_check.sh newest   a fresh venv built by docker/gpu/Dockerfile's own RUN
#                                          steps (torch at the top of moedpo's range, then the
#                                          package with today's releases of everything else)
#   bash scripts/install_check.sh oldest   a fresh venv with the lower bounds pyproject.toml
#                                          declares for torch and transformers, then the package
#   bash scripts/install_check.sh tpu PY   the torch_xla venv scripts/xla_env.sh built from
#                                          docker/tpu/Dockerfile's RUN steps, on 4 CPU devices
#
# The package is installed as a wheel built from a clean copy of the source (`pip install .`,
# never -e), and the runs start in an empty folder elsewhere, so a file the wheel lacks or an
# import that only works from the checkout fails here. Each run: `moedpo --version`, `moedpo train
# +experiment=demo max_steps=3`, and the seed recipe's first line as `run_dpo_no_trainer` (its
# full-size config swapped for the tiny one, 2 steps); for tpu, the image's CMD instead. The fresh venvs (up to ~6 GB) are removed
# afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
DEPS=("$PYTHON" "$ROOT/scripts/deps.py")
WHICH="${1:-}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/moedpo-install-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say() { echo "install_check[$WHICH]: $*" >&2; }

fresh_venv() {
  say "creating a fresh venv in $WORK/venv"
  "$PYTHON" -m venv "$WORK/venv"
  "$WORK/venv/bin/python" -m pip install -q --upgrade pip
  BIN="$WORK/venv/bin"
  # The image's `COPY . .`: a clean copy of the source, so pip's in-place build of the package
  # sees no build/ leftovers (and the checkout gets none).
  "${DEPS[@]}" context "$WORK/src"
}

EXTRA=()
case "$WHICH" in
  newest)
    fresh_venv
    DOCKERFILE="$ROOT/docker/gpu/Dockerfile"
    while IFS= read -r step; do
      say "RUN $step  (from $DOCKERFILE)"
      (cd "$WORK/src" && PATH="$BIN:$PATH" PIP_QUIET=1 bash -euo pipefail -c "$step")
    done < <("${DEPS[@]}" steps "$DOCKERFILE")
    ;;
  oldest)
    fresh_venv
    mapfile -t LOWEST < <("${DEPS[@]}" lowest torch transformers)
    say "pip install ${LOWEST[*]}, then the package"
    "$BIN/pip" install -q "${LOWEST[@]}"
    # The lower bounds stay as constraints, so installing the package cannot lift them.
    printf '%s\n' "${LOWEST[@]}" > "$WORK/constraints.txt"
    (cd "$WORK/src" && "$BIN/pip" install -q -c "$WORK/constraints.txt" .)
    ;;
  tpu)
    BIN="$(dirname "${2:?usage: install_check.sh tpu PYTHON_OF_THE_XLA_VENV}")"
    export PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 TF_CPP_MIN_LOG_LEVEL=2
    EXTRA=(parallel.backend=xla data.static_shapes=true)
    ;;
  *)
    echo "usage: install_check.sh newest|oldest|tpu PYTHON" >&2
    exit 2
    ;;
esac

RUNS="$WORK/runs"
mkdir -p "$WORK/elsewhere"
cd "$WORK/elsewhere"  # nothing of the checkout is importable from here
"$BIN/python" "$ROOT/scripts/deps.py" show --add moedpo >&2
where="$("$BIN/python" -c 'import moedpo; print(moedpo.__file__)')"
case "$where" in
  "$ROOT"/* | "$WORK/src"/*) say "moedpo was imported from the checkout ($where), not the wheel"; exit 1 ;;
esac
"$BIN/moedpo" --version
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$WORK/hf"
if [[ "$WHICH" == tpu ]]; then
  # The image's CMD, 3 steps. (The seed's 4096-token line compiles graphs too large for 4
  # virtual devices on this machine; tests/parallel/test_spmd.py runs the seed's TPU line.)
  say "run_dpo_no_trainer +experiment=demo max_steps=3 ${EXTRA[*]}  (the TPU image's CMD)"
  "$BIN/run_dpo_no_trainer" +experiment=demo max_steps=3 "output_dir=$RUNS" "${EXTRA[@]}"
  RUN_NAMES=(demo)
else
  say "moedpo train +experiment=demo max_steps=3"
  "$BIN/moedpo" train +experiment=demo max_steps=3 "output_dir=$RUNS"
  say "run_dpo_no_trainer: the seed's first line, its full-size config swapped for the tiny one"
  "$BIN/run_dpo_no_trainer" model.config_path=tiny-mixtral.json max_length=4096 \
    per_device_train_batch_size=1 max_steps=2 "output_dir=$RUNS"
  RUN_NAMES=(demo moe_trial)
fi
for run in "${RUN_NAMES[@]}"; do
  "$BIN/python" - "$RUNS/$run/metrics.jsonl" <<'EOF'
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r["train/loss"] for r in rows if "train/loss" in r]
evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
assert train and evals and all(map(math.isfinite, train + evals)), f"{sys.argv[1]}: {rows}"
print(f"install_check: {sys.argv[1]}: {len(train)} train rows, last eval loss {evals[-1]:.4f}")
EOF
done
say "passed"
