"""Command line: `moedpo train KEY=VALUE ...` (the same Hydra app as run_dpo_no_trainer.py).

Mistakes the user can fix (config, data, model paths) end in one paragraph on stderr and exit
code 2; HYDRA_FULL_ERROR=1 shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError
from .config import (
    GROUPS,
    ConfigError,
    DPOConfig,
    register_schema,
    schema_keys,
    suggest_key,
)
from .data import DataError
from .metrics import MetricsError
from .models.load import ModelLoadError
from .optim import NonFiniteError
from .trust import UntrustedCheckpoint

USER_ERRORS = (ConfigError, DataError, ModelLoadError, CheckpointError, NonFiniteError,
               MetricsError, UntrustedCheckpoint)
USAGE = """usage: moedpo COMMAND ... | moedpo --version

commands:
  train [KEY=VALUE ...]          train with DPO; every KEY of docs/reference/config.md, e.g.
                                 `moedpo train +experiment=demo` (same as run_dpo_no_trainer.py)
  export RUN_DIR|CHECKPOINT OUT [--merge] [--trust]
                                 write the trained policy as a Hugging Face folder
                                 (LoRA runs: a PEFT adapter folder, or merged); --trust
                                 reads checkpoints this machine did not sign
  convert HF_DIR OUT             a Hugging Face model -> DCP weights for checkpoint_manager_path
  convert --to-hf DCP OUT --model NAME_OR_PATH | --config-path JSON [--trust]
                                 DCP weights -> a Hugging Face folder
  plot RUN_DIR [RUN_DIR ...] [-o PNG]
                                 draw a run's metrics (several runs overlaid)
  data inspect [KEY=VALUE ...]   the data report of a training config, without training
  plan [KEY=VALUE ...] [--devices N] [--hardware NAME] [--routing-skew X] [--json]
                                 memory per device and time per step of a training config
                                 on N devices, traced on fake tensors (docs/planning.md)"""

register_schema()


def fail(message: str) -> None:
    print(f"moedpo: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_override_keys(overrides: list[str]) -> None:
    """Unknown keys get a one-line error with the closest known key, before Hydra starts."""
    known = set(schema_keys())
    for item in overrides:
        if item.startswith(("-", "~", "hydra.", "hydra/")) or "=" not in item:
            continue
        key = item.split("=", 1)[0].lstrip("+")  # `+key=` adds a key: a typo all the same
        if key in GROUPS or key.startswith(("dataset_dir.", "model.config_overrides.")):
            continue
        if key not in known:
            fail(f"unknown config key '{key}'{suggest_key(key)}; see docs/reference/config.md")


@hydra.main(version_base=None, config_path="pkg://moedpo.conf", config_name="config")
def hydra_main(raw: DictConfig) -> None:
    from .trainer import run

    try:
        cfg: DPOConfig = OmegaConf.to_object(raw)
        run(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger("moedpo").error("%s", err)
        fail(str(err))


def check_override_values(overrides: list[str]) -> DPOConfig:
    """Compose the config once before Hydra runs it: a value of the wrong type (`lr=abc`) or
    an unknown group option becomes one `moedpo: error:` line, not Hydra's block."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module("moedpo.conf", version_base=None):
            return OmegaConf.to_object(compose("config", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ or err  # Hydra wraps OmegaConf's message, which names the type
        lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
        key = next((line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("full_key:")), None)
        fail(f"{key + ': ' if key else ''}{lines[0] if lines else type(err).__name__}")


def train(overrides: list[str], prog: str = "moedpo train") -> None:
    from .validate import check_run_location

    check_override_keys(overrides)
    if not any(item.startswith(("hydra.", "hydra/", "--")) for item in overrides):
        try:  # Hydra creates the run folder (and writes .hydra/) before the run validates
            check_run_location(check_override_values(overrides))
        except ConfigError as err:
            fail(str(err))
    sys.argv = [prog, *overrides]
    hydra_main()


def seed_main() -> None:
    """`run_dpo_no_trainer KEY=VALUE ...`: the seed's command lines from an installed package
    (`python run_dpo_no_trainer.py ...` works only inside a checkout)."""
    train(sys.argv[1:], prog="run_dpo_no_trainer")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"moedpo {__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        train(rest)
    elif command in TOOLS:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            TOOLS[command](rest)
        except (*USER_ERRORS, FileNotFoundError) as err:
            fail(str(err))
    else:
        fail(f"unknown command '{command}'; commands: train, {', '.join(TOOLS)}")


def plot_command(argv: list[str]) -> None:
    from .plot import plot_runs

    parser = argparse.ArgumentParser(prog="moedpo plot", description=(
        "Draw loss, reward accuracy, margins, rewards, lr, gradient norm, throughput and MoE "
        "routing of one or more runs (overlaid) into one PNG."))
    parser.add_argument("runs", type=Path, nargs="+", help="run directories")
    parser.add_argument("-o", "--out", type=Path, help="PNG path (default: "
                        "FIRST_RUN/plots/metrics.png)")
    args = parser.parse_args(argv)
    out, _ = plot_runs(args.runs, args.out or args.runs[0] / "plots" / "metrics.png")
    print(f"plot written: {out}")


def data_command(argv: list[str]) -> None:
    if not argv or argv[0] != "inspect":
        fail("usage: moedpo data inspect [KEY=VALUE ...]")
    check_override_keys(argv[1:])
    from .inspect_data import inspect

    print(inspect(check_override_values(argv[1:])))


def export_command(argv: list[str]) -> None:
    from .export import export

    parser = argparse.ArgumentParser(prog="moedpo export", description=(
        "Write the policy of a run (its newest checkpoint) or of one checkpoint as a Hugging "
        "Face folder: safetensors weights, config and tokenizer."))
    parser.add_argument("source", type=Path, help="run directory or run_dir/checkpoints/step_N")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--merge", action="store_true", help=(
        "LoRA runs: fold the adapters into the weights and write a plain HF model (without "
        "it: a PEFT adapter folder for PeftModel.from_pretrained)"))
    parser.add_argument("--trust", action="store_true", help=(
        "read the run's checkpoints even if this machine's key did not sign them (their "
        ".metadata is a pickle: it runs code), and allow its model.trust_remote_code"))
    args = parser.parse_args(argv)
    used = export(args.source, args.out, args.merge, args.trust)
    print(f"exported {used} to {args.out}")


def convert_command(argv: list[str]) -> None:
    from .config import ModelConfig
    from .export import dcp_to_hf, hf_to_dcp

    parser = argparse.ArgumentParser(prog="moedpo convert", description=(
        "Convert between a Hugging Face model folder and the DCP weights format of "
        "checkpoint_manager_path ({'model': state_dict})."))
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--to-hf", action="store_true", help="DCP -> Hugging Face folder")
    parser.add_argument("--model", help="with --to-hf: model (hub id or folder) for the config "
                        "and tokenizer")
    parser.add_argument("--config-path", help="with --to-hf: a model JSON instead of --model")
    parser.add_argument("--dtype", default="float32", help="dtype of the written weights")
    parser.add_argument("--trust", action="store_true", help=(
        "with --to-hf: read the DCP folder even if this machine's key did not sign it (its "
        ".metadata is a pickle: it runs code)"))
    args = parser.parse_args(argv)
    if not args.to_hf:
        hf_to_dcp(args.source, args.out, args.dtype)
    else:
        if not (args.model or args.config_path):
            fail("convert --to-hf needs --model NAME_OR_PATH or --config-path JSON")
        model = ModelConfig(name_or_path=args.model or "", config_path=args.config_path,
                            policy_dtype=args.dtype, reference_dtype=args.dtype,
                            mixed_precision=False)
        dcp_to_hf(args.source, Path(args.out), model, args.trust)
    print(f"wrote {args.out}")


def plan_command(argv: list[str]) -> None:
    import json

    from .planner import DEFAULT_MARGIN, plan
    from .planner.hardware import NAMES, hardware
    from .planner.report import text

    def device(name: str):
        try:
            return name if name == "cpu" else hardware(name)  # cpu is timed once planning
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("--hardware ")) from None

    parser = argparse.ArgumentParser(prog="moedpo plan", description=(
        "Trace one training step of the config (the same KEY=VALUE overrides as moedpo "
        "train) on fake tensors over N fake devices: memory per device by part, whether it "
        "fits, predicted step time and MFU. Nothing is downloaded or allocated."))
    parser.add_argument("overrides", nargs="*", help="config KEY=VALUE overrides")
    parser.add_argument("--devices", type=int, default=1, help="devices (torchrun ranks) the "
                        "run is planned on (default 1)")
    parser.add_argument("--hardware", default="h100-80gb", type=device, help=(
        f"the device: one of {', '.join(NAMES)} (default h100-80gb; cpu times this "
        "machine), or a .yaml/.json file of your own entry (docs/planning.md)"))
    parser.add_argument("--routing-skew", type=float, default=0.0, help=(
        "MoE: the busiest expert gets 1+X times its balanced share of tokens (default 0)"))
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help=(
        "share of device memory kept free for the allocator and runtime (default 0.1)"))
    parser.add_argument("--search", action="store_true", help=(
        "plan the config's variants on the same devices (HSDP replica groups, micro-batch, "
        "activation checkpointing) and print those that fit, fastest first, as command "
        "lines"))
    parser.add_argument("--top", type=int, default=5, help="--search: variants printed "
                        "(default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    check_override_keys(args.overrides)
    cfg = check_override_values(args.overrides)
    if args.search:
        search_command(cfg, args)
        return
    result = plan(cfg, args.devices, args.hardware, args.routing_skew, args.margin)
    print(json.dumps(result.to_json(), indent=1) if args.json else text(result))


def search_command(cfg: DPOConfig, args: argparse.Namespace) -> None:
    """`moedpo plan --search`: progress on stderr, one line per traced variant."""
    import json

    from .planner import check_plannable
    from .planner.hardware import hardware
    from .planner.report import search_text, variant_line
    from .planner.search import NOT_SEARCHED, search

    hw = hardware(args.hardware) if isinstance(args.hardware, str) else args.hardware
    check_plannable(cfg, args.devices)
    found = search(cfg, args.devices, hw, args.routing_skew, args.margin,
                   lambda c: print(f"traced: {variant_line(c)}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({"candidates": [
            {**c.plan.to_json(), "changes": c.changes,
             "command": c.command(args.overrides, args.devices, hw)} for c in found],
            "not_searched": list(NOT_SEARCHED)}, indent=1))
    else:
        print(search_text(found, args.overrides, args.devices, args.top, NOT_SEARCHED))


TOOLS = {"export": export_command, "convert": convert_command, "plot": plot_command,
         "data": data_command, "plan": plan_command}

if __name__ == "__main__":
    main()
