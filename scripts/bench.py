"""Benchmark sparse vs dense training: python scripts/bench.py [--quick] > bench.json."""

import sys

from moma_jax.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
