"""The selective state-space scan and the short causal conv1d of a Mamba mixer, both reset at
document boundaries (Gu & Dao 2023, arXiv 2312.00752, Algorithm 2; model/mamba.py uses them).

Per channel i and state index n, with A = -exp(A_log) (S4D-real) and delta_t > 0:

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t        (state [Di, Ds])
    y_t = C_t . h_t + D u_t

The recurrence h_t = a_t h_{t-1} + b_t is associative in (a, b): (a1, b1) then (a2, b2) is
(a1 a2, a2 b1 + b2), so it can run as `jax.lax.associative_scan` (log-depth, parallel in L:
the accelerators' path) or as a `jax.lax.scan` over tokens that keeps one [B, Di, Ds] state and
reads y_t out of it at each step (the CPU's path: there the associative scan's [B, L, Di, Ds]
intermediates cost ~2.5x the time at the tiny shape). Both compute the same recurrence; only
float32 rounding differs (`model.mamba.scan`, `resolve_scan`). A token that starts a document
(its segment id differs from the previous token's) gets a_t = 0: the state restarts there, as
if the document were alone in its row. The conv window likewise only reads earlier tokens of
the same segment. Decoding passes the state and the conv window (with its tokens' segment ids)
from the previous call, so a chunk continues exactly where the last one stopped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NO_SEGMENT = -1  # the segment id of an empty conv-window slot: equal to no token's


def document_starts(segment_BxL: jax.Array, prev_segment_B: jax.Array) -> jax.Array:
    """[B, L] bool: the token's segment differs from the one before it (`prev_segment_B` for
    the first token of the chunk: NO_SEGMENT when nothing came before)."""
    before_BxL = jnp.concatenate([prev_segment_B[:, None], segment_BxL[:, :-1]], axis=1)
    return segment_BxL != before_BxL


def segment_conv(
    x_BxLxDi: jax.Array,
    segment_BxL: jax.Array,
    w_WxDi: jax.Array,
    b_Di: jax.Array,
    window_BxWpxDi: jax.Array,
    window_segment_BxWp: jax.Array,
) -> jax.Array:
    """Causal depthwise conv1d of width W: out_t = b + sum_k w[k] x_{t-(W-1)+k}, where a
    tap reads a token only if it lies in the same segment as t. Tokens before the chunk come from
    the window (Wp = W - 1 of them, oldest first; empty slots have segment NO_SEGMENT).
    `w[W-1]` multiplies the token itself (PyTorch's Conv1d with W-1 left padding)."""
    width, length = w_WxDi.shape[0], x_BxLxDi.shape[1]
    xs_BxTxDi = jnp.concatenate([window_BxWpxDi.astype(x_BxLxDi.dtype), x_BxLxDi], axis=1)
    seg_BxT = jnp.concatenate([window_segment_BxWp, segment_BxL], axis=1)
    out_BxLxDi = jnp.broadcast_to(b_Di.astype(x_BxLxDi.dtype), x_BxLxDi.shape)
    for k in range(width):
        tap_BxLxDi = xs_BxTxDi[:, k : k + length]
        same_BxL = seg_BxT[:, k : k + length] == segment_BxL
        out_BxLxDi = out_BxLxDi + jnp.where(same_BxL[..., None], tap_BxLxDi, 0) * w_WxDi[k]
    return out_BxLxDi


def resolve_scan(scan: str) -> str:
    """`model.mamba.scan` ("auto", "associative", "sequential") as the path to trace: "auto" is
    "sequential" on CPU and "associative" on accelerators."""
    if scan == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "associative"
    return scan


def selective_scan(
    u_BxLxDi: jax.Array,
    delta_BxLxDi: jax.Array,
    a_DixDs: jax.Array,
    b_BxLxDs: jax.Array,
    c_BxLxDs: jax.Array,
    d_Di: jax.Array,
    starts_BxL: jax.Array,
    h0_BxDixDs: jax.Array,
    scan: str = "associative",
) -> tuple[jax.Array, jax.Array]:
    """The scan of the module docstring in float32, the state starting from `h0` and restarting
    (from zero) at every token of `starts`, run as `scan` ("associative", "sequential" or
    "auto", `resolve_scan`). Returns y [B, L, Di] and the last state [B, Di, Ds]."""
    f32 = jnp.float32
    u, delta, a, b, c, h0 = (
        x.astype(f32) for x in (u_BxLxDi, delta_BxLxDi, a_DixDs, b_BxLxDs, c_BxLxDs, h0_BxDixDs)
    )
    run = _sequential if resolve_scan(scan) == "sequential" else _associative
    y_BxLxDi, h_BxDixDs = run(u, delta, a, b, c, starts_BxL, h0)
    return y_BxLxDi + d_Di.astype(f32) * u, h_BxDixDs


def _associative(u_BxLxDi, delta_BxLxDi, a_DixDs, b_BxLxDs, c_BxLxDs, starts_BxL, h0_BxDixDs):
    """The recurrence as one associative scan over (a, b) pairs: (C_t . h_t, the last state)."""
    decay_BxLxDixDs = jnp.exp(delta_BxLxDi[..., None] * a_DixDs)
    decay_BxLxDixDs = jnp.where(starts_BxL[:, :, None, None], 0.0, decay_BxLxDixDs)
    inject_BxLxDixDs = (delta_BxLxDi * u_BxLxDi)[..., None] * b_BxLxDs[:, :, None, :]

    def combine(first, second):
        (a1, b1), (a2, b2) = first, second
        return a1 * a2, a2 * b1 + b2

    decay_BxLxDixDs, h_BxLxDixDs = jax.lax.associative_scan(
        combine, (decay_BxLxDixDs, inject_BxLxDixDs), axis=1
    )
    h_BxLxDixDs = h_BxLxDixDs + decay_BxLxDixDs * h0_BxDixDs[:, None]
    return jnp.einsum("bldn,bln->bld", h_BxLxDixDs, c_BxLxDs), h_BxLxDixDs[:, -1]


def _sequential(u_BxLxDi, delta_BxLxDi, a_DixDs, b_BxLxDs, c_BxLxDs, starts_BxL, h0_BxDixDs):
    """The recurrence one token at a time: (C_t . h_t summed over the state, the last state)."""

    def step(h_BxDixDs, xs):
        u_BxDi, delta_BxDi, b_BxDs, c_BxDs, start_B = xs
        decay_BxDixDs = jnp.exp(delta_BxDi[..., None] * a_DixDs)
        decay_BxDixDs = jnp.where(start_B[:, None, None], 0.0, decay_BxDixDs)
        inject_BxDixDs = (delta_BxDi * u_BxDi)[..., None] * b_BxDs[:, None, :]
        h_BxDixDs = decay_BxDixDs * h_BxDixDs + inject_BxDixDs
        return h_BxDixDs, jnp.einsum("bdn,bn->bd", h_BxDixDs, c_BxDs)

    time_major = [jnp.swapaxes(x, 0, 1) for x in (u_BxLxDi, delta_BxLxDi, b_BxLxDs, c_BxLxDs)]
    h_BxDixDs, y_LxBxDi = jax.lax.scan(
        step, h0_BxDixDs, (*time_major, jnp.swapaxes(starts_BxL, 0, 1))
    )
    return jnp.swapaxes(y_LxBxDi, 0, 1), h_BxDixDs
