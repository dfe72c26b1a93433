"""The expert layer alone, on any device: the sparse FFN (route, pack, grouped SwiGLU, combine)
against a dense SwiGLU of the same active FLOPs, for each expert-compute path, and the grouped
GEMM (`jax.lax.ragged_dot`) against a dense GEMM of the same FLOPs.

`python scripts/bench_experts.py [--device]` prints one JSON object (a table on stderr). On a
GPU the default shape is the 1.4b layer (d=2048, F=5461) over 4 routing groups of 4,096 tokens
in bf16, with MFU against the device's bf16 peak; on CPU (or without --device) a small f32 shape
that runs in about a minute. Every time is the median of interleaved rounds of forward+backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moma_jax import host_memory
from moma_jax.bench.measure import machine, median
from moma_jax.bench.report import gpu_peak
from moma_jax.config import ModelConfig, SparseConfig
from moma_jax.model.context import Context
from moma_jax.model.layers import SwiGLU
from moma_jax.model.moe import SparseFFN
from moma_jax.sparse_config import EXPERT_COMPUTE

LAYOUTS: dict[str, dict[str, Any]] = {
    "moe_8x": dict(group_experts=(8,), modality_group=(0, 0)),
    "moma_4t4i": dict(group_experts=(4, 4)),
    "moma_1t1i": dict(group_experts=(1, 1)),
}
SHARES = (0.77, 0.23)


@dataclasses.dataclass(frozen=True)
class Shape:
    d_model: int
    ffn_hidden: int
    group_tokens: int
    groups: int
    dtype: str
    rounds: int


GPU = Shape(d_model=2048, ffn_hidden=5461, group_tokens=4096, groups=4, dtype="bfloat16", rounds=10)
CPU = Shape(d_model=256, ffn_hidden=682, group_tokens=2048, groups=1, dtype="float32", rounds=5)


def model_config(shape: Shape, layout: dict | None, **moe: Any) -> ModelConfig:
    sparse = SparseConfig(
        routing_group_tokens=shape.group_tokens, modality_shares=SHARES, **(layout or {}), **moe
    )
    return ModelConfig(
        vocab_size=8,
        d_model=shape.d_model,
        n_layers=1,
        n_heads=1,
        ffn_hidden=shape.ffn_hidden,
        compute_dtype=shape.dtype,
        param_dtype="float32",
        layer_pattern=("moe",) if layout else ("dense",),
        moe=sparse,
    )


def ffn_grad_fn(
    cfg: ModelConfig, x_BxLxD: jax.Array, modality_BxL: jax.Array, segment_ids_BxL: jax.Array
) -> Callable[[], Any]:
    """Forward+backward of one feed-forward alone (SparseFFN if the config has experts, else
    SwiGLU): the gradient of sum(outputs) w.r.t. its parameters and its input. The batch is an
    argument of the jitted function, so nothing about it constant-folds."""
    layer = SparseFFN(cfg, rngs=nnx.Rngs(0)) if cfg.has_experts else SwiGLU(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def total(params, x_BxLxD, modality_BxL, segment_ids_BxL):
        # The feed-forward reads no positions.
        ctx = Context(jnp.zeros_like(segment_ids_BxL), segment_ids_BxL, modality_BxL)
        y_BxLxD, _ = nnx.merge(graphdef, params)(x_BxLxD, ctx)
        return jnp.sum(y_BxLxD.astype(jnp.float32))

    grad = jax.jit(jax.grad(total, argnums=(0, 1)))
    return lambda: grad(params, x_BxLxD, modality_BxL, segment_ids_BxL)


def layer_step(cfg: ModelConfig, shape: Shape) -> Callable[[], Any]:
    """`ffn_grad_fn` on a batch whose image tokens are 23% of each group, placed at random."""
    rng = np.random.default_rng(0)
    modality = jnp.asarray((rng.random((shape.groups, shape.group_tokens)) < SHARES[1]), jnp.int32)
    x = jax.random.normal(jax.random.key(1), (shape.groups, shape.group_tokens, shape.d_model))
    return ffn_grad_fn(cfg, x.astype(cfg.compute_dtype), modality, jnp.ones_like(modality))


def gemm_pair(shape: Shape, n_experts: int) -> dict[str, Callable[[], Any]]:
    """A dense [R, D] x [D, F] GEMM and a ragged_dot of the same R rows over E experts (E equal
    groups): the same FLOPs, so their time ratio is the grouped GEMM's efficiency."""
    rows = shape.groups * shape.group_tokens
    dt = jnp.dtype(shape.dtype)
    x = jax.random.normal(jax.random.key(2), (rows, shape.d_model), dt)
    w = jax.random.normal(jax.random.key(3), (n_experts, shape.d_model, shape.ffn_hidden), dt)
    sizes = jnp.full((n_experts,), rows // n_experts, jnp.int32)
    dense = jax.jit(lambda x, w: jnp.dot(x, w[0], preferred_element_type=jnp.float32))
    ragged = jax.jit(
        lambda x, w: jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
    )
    return {"gemm/dense": lambda: dense(x, w), f"gemm/ragged_{n_experts}x": lambda: ragged(x, w)}


def layout_names(seconds: dict[str, float]) -> list[str]:
    return [k for k in seconds if "/" in k and not k.startswith("gemm")]


def check_paths_agree(shape: Shape) -> dict[str, float]:
    """Max |slabs - ragged_dot| of each layout's output, in float32 on this device (a check that
    the two expert-compute paths compute one layer, where the tests cannot run)."""
    small = dataclasses.replace(shape, dtype="float32", groups=1)
    out = {}
    for name, layout in LAYOUTS.items():
        ys = []
        for compute in EXPERT_COMPUTE:
            cfg = model_config(small, layout, expert_compute=compute)
            layer = SparseFFN(cfg, rngs=nnx.Rngs(0))
            rng = np.random.default_rng(0)
            modality = rng.random((1, small.group_tokens)) < SHARES[1]
            ctx = Context(
                positions=jnp.zeros((1, small.group_tokens), jnp.int32),
                segment_ids=jnp.ones((1, small.group_tokens), jnp.int32),
                modality=jnp.asarray(modality, jnp.int32),
            )
            x = jax.random.normal(jax.random.key(1), (1, small.group_tokens, small.d_model))
            ys.append(np.asarray(jax.jit(lambda x, layer=layer, ctx=ctx: layer(x, ctx)[0])(x)))
        out[name] = float(np.max(np.abs(ys[0] - ys[1])))
    return out


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call; each round calls every function once, in a fresh order."""
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for i in order.permutation(len(fns)):
            name = list(fns)[i]
            start = time.perf_counter()
            jax.block_until_ready(fns[name]())
            samples[name].append(time.perf_counter() - start)
    return {k: median(v) for k, v in samples.items()}


def run(shape: Shape, first_fractions: tuple[float, ...] = ()) -> dict[str, Any]:
    """Times every layout and expert-compute path against the dense SwiGLU; each of
    `first_fractions` adds the slab path at that `model.moe.first_fraction` (named
    `{layout}/slabs_ff{value}`), the per-backend default to choose by measurement."""
    dense_cfg = model_config(shape, None)
    fns = {"dense": layer_step(dense_cfg, shape)}
    for name, layout in LAYOUTS.items():
        for compute in EXPERT_COMPUTE:
            cfg = model_config(shape, layout, expert_compute=compute)
            fns[f"{name}/{compute}"] = layer_step(cfg, shape)
        for fraction in first_fractions:
            cfg = model_config(shape, layout, first_fraction=fraction)
            fns[f"{name}/slabs_ff{fraction:g}"] = layer_step(cfg, shape)
    fns.update(gemm_pair(shape, 8))
    print(f"[bench_experts] timing {len(fns)} functions", file=sys.stderr, flush=True)
    seconds = time_interleaved(fns, shape.rounds)
    tokens = shape.groups * shape.group_tokens
    # fwd+bwd of one SwiGLU over every token: 3 x 2 x 3 x D x F per token (the active FLOPs of
    # every layout here: expert choice at c = 1 and one-expert groups use one FFN per token).
    flops = 3 * 2 * 3 * shape.d_model * shape.ffn_hidden * tokens
    gemm_flops = 2 * tokens * shape.d_model * shape.ffn_hidden
    peak = gpu_peak()
    report: dict[str, Any] = {
        "shape": dataclasses.asdict(shape),
        "machine": machine(),
        "seconds": seconds,
        "ratio_to_dense": {
            k: v / seconds["dense"] for k, v in seconds.items() if k in layout_names(seconds)
        },
        "ragged_gemm_over_dense_gemm": seconds["gemm/ragged_8x"] / seconds["gemm/dense"],
        "active_tflops_per_s": {
            k: flops / v / 1e12 for k, v in seconds.items() if not k.startswith("gemm")
        },
        "gemm_tflops_per_s": {
            k: gemm_flops / v / 1e12 for k, v in seconds.items() if k.startswith("gemm")
        },
    }
    if peak:
        report["mfu"] = {k: v * 1e12 / peak[0] for k, v in report["active_tflops_per_s"].items()}
        report["peak"] = peak[1]
    return report


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()  # before JAX starts its threads
    p = argparse.ArgumentParser(prog="bench_experts.py", description=__doc__)
    p.add_argument("--device", action="store_true", help="the GPU shape (default on a GPU)")
    p.add_argument("--rounds", type=int, help="timed rounds (default 10 GPU, 5 CPU)")
    args = p.parse_args(argv)
    shape = GPU if args.device or jax.default_backend() == "gpu" else CPU
    if args.rounds:
        shape = dataclasses.replace(shape, rounds=args.rounds)
    report = run(shape)
    report["slabs_vs_ragged_max_abs_diff"] = check_paths_agree(shape)
    for name, seconds in report["seconds"].items():
        ratio = report["ratio_to_dense"].get(name)
        print(
            f"{name:24s} {seconds * 1e3:9.2f} ms" + (f"  {ratio:5.2f}x dense" if ratio else ""),
            file=sys.stderr,
        )
    print(json.dumps(report))
    return 0
