"""Seed-compatible entry point: `python run_dpo_no_trainer.py KEY=VALUE ...`.

Same Hydra app and overrides as the original TPU trainer; the same as `moedpo train`.
"""

import sys

from moedpo.cli import train

if __name__ == "__main__":
    train(sys.argv[1:], prog=sys.argv[0])
