"""Prepare the bundled dataset, or your own corpus: python scripts/prepare_data.py --help."""

import sys

from moma_jax.commands.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
