"""The Python API: the same run as `moedpo train KEY=VALUE ...`, from a notebook or a script.

    import moedpo

    result = moedpo.train({"max_steps": 20, "lr": 5e-4}, overrides=["+experiment=demo"])
    print(result.final_eval["rewards/accuracies"], result.run_dir)

A config is built as the command line builds it: the shipped defaults with the overrides'
groups (`+experiment=demo`, `model=tiny`), then the values of a YAML file or a dict (nested
or dotted keys, e.g. a run's own `config.yaml`), then the overrides' values on top. The types
and keys are the schema's (moedpo/config.py): a wrong key or type is a one-line ConfigError.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .callbacks import Callback
from .config import GROUPS, ConfigError, DPOConfig, register_schema, suggest_key

OPEN_KEYS = ("model.config_overrides.",)


def _is_group(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in GROUPS or override.startswith(("~", "hydra"))


def _values(source: str | Path | Mapping[str, Any]):
    from omegaconf import OmegaConf

    if isinstance(source, Mapping):
        dotted = {k: v for k, v in source.items() if "." in str(k)}
        nested = OmegaConf.create({k: v for k, v in source.items() if "." not in str(k)})
        for key, value in dotted.items():
            OmegaConf.update(nested, key, value, force_add=True)
        return nested
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"{source}: no such config file; give a YAML file, a dict or a "
                          "DPOConfig")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml's own errors name the line
        raise ConfigError(f"{path}: not a YAML config ({str(err).splitlines()[0]})") from err


def load_config(source: str | Path | Mapping[str, Any] | None = None,
                overrides: Sequence[str] = ()) -> DPOConfig:
    """A DPOConfig from the shipped defaults, a YAML file or dict of values, and overrides
    (`KEY=VALUE` strings and group choices such as `+experiment=demo`), in that order of
    precedence from lowest to highest."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    # Keys of an open dict (model.config_overrides.*) are added by Hydra's `+key=`.
    added = ["+" + o.lstrip("+") for o in overrides if o.lstrip("+").startswith(OPEN_KEYS)]
    groups = [o for o in overrides if _is_group(o)] + added
    values = [o.lstrip("+") for o in overrides
              if not _is_group(o) and not o.lstrip("+").startswith(OPEN_KEYS)]
    try:
        with initialize_config_module("moedpo.conf", version_base=None):
            raw = compose("config", overrides=groups)
        if source is not None:
            raw = OmegaConf.merge(raw, _values(source))
        if values:
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(values))
        return OmegaConf.to_object(raw)
    except (HydraException, OmegaConfBaseException) as err:
        key = getattr(err, "full_key", None)
        first = str(err.__cause__ or err).strip().splitlines()[0]
        hint = suggest_key(key) if key and "not in" in first.lower() else ""
        raise ConfigError(f"{key + ': ' if key else ''}{first}{hint}") from err


def train(config: DPOConfig | str | Path | Mapping[str, Any] | None = None,
          overrides: Sequence[str] = (), callbacks: Iterable[Callback] = ()):
    """Train as configured and return a RunResult (`final_eval`, `policy`, `run_dir`,
    `preempted`). `config`: a DPOConfig, a YAML file, a dict of values, or None (the
    defaults); `overrides` as on the command line; `callbacks` get the run's events
    (moedpo.callbacks.Callback). Under torchrun every rank calls it, as with the CLI."""
    from .trainer import run

    cfg = config if isinstance(config, DPOConfig) else load_config(config, overrides)
    if isinstance(config, DPOConfig) and overrides:
        raise ConfigError("moedpo.train: give overrides with a dict or YAML config, or set "
                          "them on the DPOConfig itself")
    return run(cfg, callbacks=list(callbacks))
