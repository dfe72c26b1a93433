"""A benchmark row per layer kind against dense: python scripts/bench_kinds.py > kinds.json."""

import sys

from moma_jax.bench.kinds import main

if __name__ == "__main__":
    sys.exit(main())
