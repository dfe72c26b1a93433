"""The benchmark's timed functions: a compiled train step with its own donated state, a
feed-forward alone, the reference matmul, the interleaved sampler and the input pipeline."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moma_jax import data as data_lib
from moma_jax.bench.experts import ffn_grad_fn
from moma_jax.bench.measure import Sample, measure
from moma_jax.bench.report import FFN_CALLS
from moma_jax.config import ExperimentConfig, ModelConfig
from moma_jax.sharding import batch_sharding, make_mesh
from moma_jax.train.state import init_state, make_optimizer
from moma_jax.train.step import jit_train_step


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class StepBench:
    """One configuration's train step, compiled ahead of time, with its own donated state."""

    def __init__(
        self, cfg: ExperimentConfig, batch_np: dict[str, np.ndarray], devices: list | None = None
    ):
        mesh = make_mesh(cfg.mesh, devices or jax.devices()[:1])
        tx = make_optimizer(cfg.optim)
        graphdef, init_fn, abstract, shardings = init_state(cfg, tx, mesh)
        batch_sh = batch_sharding(mesh)
        step: Any = jit_train_step(graphdef, cfg, tx, shardings, batch_sh, mesh)
        self.batch = {k: jax.device_put(v, batch_sh) for k, v in batch_np.items()}
        start = time.perf_counter()
        self.compiled = step.lower(abstract, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        # Only the initial values matter here: with light LLVM optimisation the init compiles in
        # ~2.5 s instead of ~12 s per configuration on the 2-core CPU, and runs as fast.
        init = init_fn.lower().compile(compiler_options={"xla_backend_optimization_level": 1})
        self.state = init()
        self.metrics: dict = {}

    def __call__(self) -> Any:
        self.state, self.metrics = self.compiled(self.state, self.batch)
        return self.state, self.metrics

    def memory_mib(self) -> float | None:
        """XLA's estimate of the step's peak: arguments + outputs + temporaries - donated."""
        m = self.compiled.memory_analysis()
        if m is None:
            return None
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        return (total - m.alias_size_in_bytes) / 2**20


def build_steps(
    configs: dict[str, ExperimentConfig], batch_np: dict[str, np.ndarray]
) -> dict[str, StepBench]:
    steps = {}
    for name, cfg in configs.items():
        log(f"compiling the {name} train step")
        steps[name] = StepBench(cfg, batch_np)
    return steps


def matmul_fn(n: int, dtype: str) -> Callable[[], jax.Array]:
    """A jitted n x n @ n x n matmul (2 n^3 FLOPs): the in-process peak stand-in."""
    a_NxN = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b_NxN = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return lambda: mm(a_NxN, b_NxN)


def ffn_fn(model_cfg: ModelConfig, batch_np: dict[str, np.ndarray]) -> Callable[[], Any]:
    """FFN_CALLS forward+backward passes of one feed-forward alone (SparseFFN if the config has
    experts, else SwiGLU): the gradient of sum(outputs) w.r.t. its parameters and its input."""
    modality_BxL = jnp.asarray(batch_np["modality"])
    x_BxLxD = jax.random.normal(jax.random.key(2), (*modality_BxL.shape, model_cfg.d_model))
    step = ffn_grad_fn(model_cfg, x_BxLxD, modality_BxL, jnp.asarray(batch_np["segment_ids"]))
    return lambda: [step() for _ in range(FFN_CALLS)]


def interleave(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, seed: int = 0
) -> dict[str, list[Sample]]:
    """Samples of each function: `warmup` untimed rounds, then `rounds` rounds in which every
    function runs once, in a fresh random order each round."""
    names, rng = list(fns), np.random.default_rng(seed)
    for r in range(warmup):
        for name in names:
            jax.block_until_ready(fns[name]())
        log(f"warm-up round {r + 1}/{warmup} done")
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for r in range(rounds):
        start = time.perf_counter()
        for i in rng.permutation(len(names)):
            samples[names[i]].append(measure(fns[names[i]]))
        log(f"round {r + 1}/{rounds}: {time.perf_counter() - start:.1f} s")
    return samples


def pipeline_tokens_per_s(cfg: ExperimentConfig, n_batches: int) -> dict[str, float]:
    """Packed tokens per second from a fresh train iterator (its first batch excluded)."""
    start = time.perf_counter()
    it = data_lib.make_train_iterator(
        data_lib.ensure_data(cfg.data.path or None),
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        seed=cfg.data.seed + 1,  # not the benchmark batch's stream
    )
    next(it)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    seconds = time.perf_counter() - start
    tokens = n_batches * cfg.data.batch_size * cfg.data.seq_len
    return {"tokens_per_s": tokens / seconds, "first_batch_s": first_s}
