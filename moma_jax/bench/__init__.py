"""The benchmark: sparse vs dense train-step time, the matmul fraction (the CPU stand-in for
MFU), expert-count scaling and the input pipeline, all timed in one process on one device.

`python scripts/bench.py [--quick]` runs it; docs/benchmarks.md explains the method and the
numbers. From a notebook, `bench.run(bench.QUICK)` returns the report as a dict.

- `measure`: timed samples (wall, CPU, page faults), robust summaries, the machine.
- `report`: ratios, FLOPs accounting, targets and the table, from the samples.
- `timed`: the timed functions (train step, feed-forward, matmul, pipeline) and the sampler.
- `runner`: configurations, the two interleaved phases, `run` and `main`.
"""

from moma_jax.bench.runner import FULL, QUICK, Plan, main, run

__all__ = ["FULL", "QUICK", "Plan", "main", "run"]
