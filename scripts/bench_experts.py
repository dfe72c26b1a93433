"""Entry point: python scripts/bench_experts.py [--device] (see moma_jax/bench/experts.py)."""

import sys

from moma_jax.bench.experts import main

sys.exit(main())
