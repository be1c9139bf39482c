"""moedpo: Direct Preference Optimization for Mixture-of-Experts and dense language models."""

__version__ = "0.2.0"


def train(config=None, overrides=(), callbacks=()):
    """Train with DPO: `moedpo.train({"max_steps": 20}, overrides=["+experiment=demo"])`.
    See moedpo.api.train (imported on first use, so `import moedpo` stays light)."""
    from .api import train as _train

    return _train(config, overrides, callbacks)


def load_config(source=None, overrides=()):
    """The DPOConfig `train` would run; see moedpo.api.load_config."""
    from .api import load_config as _load_config

    return _load_config(source, overrides)
