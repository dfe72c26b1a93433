"""Train and compare a suite at equal FLOPs: python scripts/compare.py --suite paper_tiny."""

import sys

from moma_jax.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
