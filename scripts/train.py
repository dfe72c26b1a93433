"""Train a named experiment: python scripts/train.py --exp dense_tiny [--steps N] [--set k=v]."""

import sys

from moma_jax.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
