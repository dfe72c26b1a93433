"""Describe an experiment: python scripts/describe.py --exp moma_4t4i_1.4b [--json]."""

import sys

from moma_jax.commands.describe import main

if __name__ == "__main__":
    sys.exit(main())
