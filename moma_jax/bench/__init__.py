"""The benchmarks. Import the module you need (this package imports none of them, so the
device-only `experts` benchmark runs where the data stack is not installed).

- `runner` (`python scripts/bench.py`): sparse vs dense train-step time, the matmul fraction
  (the CPU stand-in for MFU), expert-count scaling and the input pipeline, timed in one process
  on one device; docs/benchmarks.md explains the method and the numbers. From a notebook,
  `from moma_jax.bench import runner; runner.run(runner.QUICK)` returns the report as a dict.
- `experts` (`python scripts/bench_experts.py`): the expert layer alone, tiles vs ragged_dot vs
  a dense SwiGLU, and the grouped GEMM's rate against a dense GEMM (MFU on a GPU).
- `timed`: the timed functions (train step, feed-forward, matmul, pipeline) and the sampler.
- `measure`: timed samples (wall, CPU, page faults), robust summaries, the machine.
- `report`: ratios, FLOPs accounting, targets and the table, from the samples.
"""
