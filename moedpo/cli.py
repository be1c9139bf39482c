"""Command line: `moedpo train KEY=VALUE ...` (the same Hydra app as run_dpo_no_trainer.py).

Mistakes the user can fix (config, data, model paths) end in one paragraph on stderr and exit
code 2; HYDRA_FULL_ERROR=1 shows the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError
from .config import ConfigError, DPOConfig, register_schema, schema_keys, suggest_key
from .data import DataError
from .models.load import ModelLoadError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, CheckpointError)
GROUPS = ("model", "sched", "experiment")
USAGE = """usage: moedpo train [KEY=VALUE ...] [+experiment=NAME]

Trains with Direct Preference Optimization. Every KEY of the config reference in README.md
can be set; e.g. `moedpo train +experiment=demo` trains the embedded tiny Mixtral on CPU.
`python run_dpo_no_trainer.py KEY=VALUE ...` is the same command."""

register_schema()


def fail(message: str) -> None:
    print(f"moedpo: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_override_keys(overrides: list[str]) -> None:
    """Unknown keys get a one-line error with the closest known key, before Hydra starts."""
    known = set(schema_keys())
    for item in overrides:
        if item.startswith(("-", "+", "~", "hydra.", "hydra/")) or "=" not in item:
            continue
        key = item.split("=", 1)[0]
        if key in GROUPS or key.startswith("dataset_dir."):
            continue
        if key not in known:
            fail(f"unknown config key '{key}'{suggest_key(key)}; see README 'Config reference'")


@hydra.main(version_base=None, config_path="pkg://moedpo.conf", config_name="config")
def hydra_main(raw: DictConfig) -> None:
    from .train import run

    try:
        cfg: DPOConfig = OmegaConf.to_object(raw)
        run(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger("moedpo").error("%s", err)
        fail(str(err))


def train(overrides: list[str], prog: str = "moedpo train") -> None:
    check_override_keys(overrides)
    sys.argv = [prog, *overrides]
    hydra_main()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        train(rest)
    else:
        fail(f"unknown command '{command}'; commands: train")


if __name__ == "__main__":
    main()
