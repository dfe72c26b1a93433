"""Entry point: python scripts/device_check.py prepare | run (moma_jax/bench/device_check.py)."""

import sys

from moma_jax.bench.device_check import main

if __name__ == "__main__":
    sys.exit(main())
