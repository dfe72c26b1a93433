"""Kernel candidates for the device check (`bench/device_check.py`), each checked against the
XLA reference on the same inputs before it is timed:

- attention under the documents' causal mask (`model/attention.py`), forward+backward: XLA
  (the [B, 1, L, L] mask), Pallas's flash kernel with segment ids (`model.attention=pallas`),
  and cuDNN through `jax.nn.dot_product_attention`, which takes no segment ids in this JAX, so
  the mask travels as an additive [B, 1, L, L] bias; cuDNN's plain causal kernel (not the same
  mask: a speed bound only, never compared) shows what the bias costs;
- grouped GEMMs against a dense GEMM of the same FLOPs: `jax.lax.ragged_dot` and Pallas's
  Mosaic-GPU `ragged_dot` (Hopper only; forward, equal groups).

A candidate that cannot run here (no GPU, not Hopper, an API this JAX lacks) is reported with
its reason and not timed; one that runs but disagrees with the reference is timed and flagged.
"""

from __future__ import annotations

import dataclasses
import functools
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moma_jax.bench.experts import time_interleaved
from moma_jax.model.attention import flash_attention, flash_fits, segment_causal_mask

Attn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    batch: int
    length: int
    heads: int
    head_dim: int
    docs: int  # documents per row (random lengths), then padding
    dtype: str
    rounds: int


# The device bench's attention (bench/runner.py DEVICE_SHAPE: 16 x 1,024 tokens, d=1024, 8 heads).
DEVICE_ATTENTION = AttentionShape(16, 1024, 8, 128, 4, "bfloat16", 10)
CPU_ATTENTION = AttentionShape(2, 64, 2, 16, 2, "float32", 2)


@dataclasses.dataclass(frozen=True)
class GemmShape:
    rows: int
    d_in: int
    d_out: int
    groups: int
    dtype: str
    rounds: int


# The 1.4b expert layer's up-projection over 16,384 rows, 8 equal groups; d_out a multiple of
# the Mosaic kernel's tiles (5,461 in the model; 5,632 = 44 x 128).
DEVICE_GEMM = GemmShape(16384, 2048, 5632, 8, "bfloat16", 10)
CPU_GEMM = GemmShape(256, 64, 128, 4, "float32", 2)


def segment_ids(shape: AttentionShape, seed: int = 0) -> np.ndarray:
    """[B, L] int32: each row holds `docs` documents of random lengths (ids 1..docs), then
    padding (0) over its last tenth at most."""
    rng = np.random.default_rng(seed)
    out = np.zeros((shape.batch, shape.length), np.int32)
    for b in range(shape.batch):
        real = shape.length - int(rng.integers(0, shape.length // 10 + 1))
        cuts = np.sort(rng.choice(np.arange(1, real), shape.docs - 1, replace=False))
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, real], strict=True)):
            out[b, lo:hi] = i + 1
    return out


def attention_candidates(on_gpu: bool) -> dict[str, tuple[Attn, bool]]:
    """name -> (attention fn (q, k, v, segment_ids) -> out, whether it computes the
    reference's mask). Off a GPU the flash kernel runs in Pallas's interpreter."""

    def xla(q, k, v, seg):
        return jax.nn.dot_product_attention(q, k, v, mask=segment_causal_mask(seg))

    def pallas(q, k, v, seg):
        return flash_attention(q, k, v, seg, interpret=not on_gpu)

    def cudnn_bias(q, k, v, seg):
        # cuDNN takes no segment ids: JAX turns the [B, 1, L, L] mask into an additive bias
        # (its own large negative constant, which avoids a cuDNN bug with -inf-like values).
        mask = segment_causal_mask(seg)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")

    def cudnn_causal(q, k, v, seg):
        del seg  # causal over the whole row: not the documents' mask
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    out: dict[str, tuple[Attn, bool]] = {"xla": (xla, True), "pallas": (pallas, True)}
    if on_gpu:
        out.update({"cudnn_bias": (cudnn_bias, True), "cudnn_causal": (cudnn_causal, False)})
    return out


def _fwd_bwd(fn: Attn, cotangent: jax.Array) -> Callable[..., Any]:
    """jit of (q, k, v, seg) -> (out, dq, dk, dv) for a fixed output cotangent."""

    def loss(q, k, v, seg):
        out = fn(q, k, v, seg)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def _max_diff(a: Any, b: Any, real_BxL: np.ndarray) -> float:
    """Max |a - b| over the real (non-padding) positions of every [B, L, ...] array."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        diff = np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))[real_BxL]
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def attention_report(shape: AttentionShape, on_gpu: bool | None = None) -> dict[str, Any]:
    """Forward+backward milliseconds of each candidate (interleaved rounds), its max
    difference from XLA over real positions (forward and gradients), or why it did not run."""
    on_gpu = jax.default_backend() == "gpu" if on_gpu is None else on_gpu
    dt = jnp.dtype(shape.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    qkv_shape = (shape.batch, shape.length, shape.heads, shape.head_dim)
    q, k, v, cot = (jax.random.normal(key, qkv_shape, jnp.float32) for key in keys)
    q, k, v = (a.astype(dt) for a in (q, k, v))
    seg_np = segment_ids(shape)
    seg = jnp.asarray(seg_np)
    real = seg_np > 0
    report: dict[str, Any] = {
        "shape": dataclasses.asdict(shape),
        "flash_tiles_fit": flash_fits(shape.length),
    }
    fns: dict[str, Callable[[], Any]] = {}
    errors: dict[str, str] = {}
    same_mask: dict[str, float] = {}
    reference = None
    for name, (fn, same) in attention_candidates(on_gpu).items():
        try:
            step = _fwd_bwd(fn, cot)
            result = jax.block_until_ready(step(q, k, v, seg))
        except Exception as e:  # a candidate this JAX or device cannot run: say why
            errors[name] = failure_reason(e)
            continue
        if name == "xla":
            reference = result
        elif same and reference is not None:
            same_mask[name] = _max_diff(result, reference, real)
        fns[name] = functools.partial(step, q, k, v, seg)
    seconds = time_interleaved(fns, shape.rounds) if fns else {}
    report["ms"] = {k: s * 1e3 for k, s in seconds.items()}
    if "xla" in seconds:
        report["vs_xla"] = {k: s / seconds["xla"] for k, s in seconds.items()}
    report["max_abs_diff_vs_xla"] = same_mask
    report["not_run"] = errors
    return report


def mosaic_ragged_dot() -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Pallas's Mosaic-GPU grouped GEMM (Hopper), with tiles from its own sweep's ranges."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    def fn(x, w, sizes):
        return ragged_dot_mgpu.ragged_dot(
            x,
            w,
            group_sizes=sizes,
            block_m=128,
            block_n=128,
            block_k=64,
            max_concurrent_steps=4,
            grid_block_n=1,
        )

    return fn


def gemm_report(shape: GemmShape, on_gpu: bool | None = None) -> dict[str, Any]:
    """Milliseconds and TFLOP/s of a dense [R, K] x [K, N] GEMM and of the grouped GEMMs of
    the same R rows over `groups` equal groups (the same FLOPs), each checked against
    `jax.lax.ragged_dot` (max |diff| relative to the output's max)."""
    on_gpu = jax.default_backend() == "gpu" if on_gpu is None else on_gpu
    dt = jnp.dtype(shape.dtype)
    x = jax.random.normal(jax.random.key(2), (shape.rows, shape.d_in), jnp.float32).astype(dt)
    w_shape = (shape.groups, shape.d_in, shape.d_out)
    w = jax.random.normal(jax.random.key(3), w_shape, jnp.float32).astype(dt) / shape.d_in**0.5
    sizes = jnp.full((shape.groups,), shape.rows // shape.groups, jnp.int32)
    candidates: dict[str, Callable[..., Any]] = {
        "dense": lambda x, w, s: jnp.dot(x, w[0], preferred_element_type=jnp.float32),
        "ragged_dot": lambda x, w, s: jax.lax.ragged_dot(
            x, w, s, preferred_element_type=jnp.float32
        ),
    }
    errors: dict[str, str] = {}
    if on_gpu and _is_hopper():
        candidates["mosaic_ragged_dot"] = mosaic_ragged_dot()
    else:
        errors["mosaic_ragged_dot"] = "needs a Hopper GPU (sm_90)"
    fns: dict[str, Callable[[], Any]] = {}
    diffs: dict[str, float] = {}
    reference = None
    for name, fn in candidates.items():
        try:
            jitted = jax.jit(fn)
            out = np.asarray(jax.block_until_ready(jitted(x, w, sizes)), np.float32)
        except Exception as e:
            errors[name] = failure_reason(e)
            continue
        if name == "ragged_dot":
            reference = out
        elif name != "dense" and reference is not None:
            diffs[name] = float(np.max(np.abs(out - reference)) / np.max(np.abs(reference)))
        fns[name] = functools.partial(jitted, x, w, sizes)
    seconds = time_interleaved(fns, shape.rounds) if fns else {}
    flops = 2 * shape.rows * shape.d_in * shape.d_out
    report: dict[str, Any] = {
        "shape": dataclasses.asdict(shape),
        "ms": {k: s * 1e3 for k, s in seconds.items()},
        "tflops_per_s": {k: flops / s / 1e12 for k, s in seconds.items()},
        "rel_diff_vs_ragged_dot": diffs,
        "not_run": errors,
    }
    if "dense" in seconds:
        report["dense_over"] = {k: seconds["dense"] / s for k, s in seconds.items()}
    return report


def _is_hopper() -> bool:
    capability = getattr(jax.devices()[0], "compute_capability", "")
    return str(capability).startswith("9")


def failure_reason(e: BaseException) -> str:
    """One line: the exception and where it was raised."""
    last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    where = f" ({last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}{where}"
