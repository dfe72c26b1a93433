"""Grouped expert compute with static shapes: every routed slot runs, nothing is dropped, and
the executed FLOPs stay near the ideal ones (MegaBlocks' idea, in plain JAX).

Routing (`routing.py`) leaves, per routing group and expert group, a fixed slot buffer per
expert (`Dispatch`, [E, C]) whose valid slots are a prefix of dynamic length. Those fixed
buffers are the unit that expert parallelism will move between devices. Here, per routing
group of N tokens:

1. `pack`: the valid slots of every expert of every expert group are laid out in ONE buffer of
   R rows, sorted by global expert id; each expert's run is padded to a multiple of T rows
   (`model.moe.tile_rows`), so every tile of T rows belongs to one expert (or to none: the
   unused tail). R is static (`SparseConfig.packed_rows`): the most slots routing can fill
   (N * experts per token, since the modalities partition the tokens) plus T - 1 padding rows
   per expert, rounded up to tiles.
2. `grouped_swiglu`: one scan over all tiles; a tile runs `layers.swiglu` with its expert's
   weights and an unused tile is skipped (`lax.cond`), so executed work is the used tiles only.
   Its VJP is written by hand: the weight gradients accumulate in place per expert instead of
   as full-size zeros per tile.
3. `combine`: y[token] += gate * out over valid rows, in float32.

`ragged_swiglu` is the other way to run step 2 (`model.moe.expert_compute="ragged_dot"`): one
grouped GEMM per projection over the rows sorted by expert, no tile padding. It is the path for
GPUs; on CPU XLA runs ragged_dot ~8x slower than a dense matmul of the same rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moma_jax.model.layers import swiglu
from moma_jax.model.routing import Dispatch


class Packing(NamedTuple):
    """One routing group's routed slots as R rows sorted by expert, runs padded to tiles.

    token_R: int32 source token in [0, N) (0 on unused rows); gate_R: float32 combine weight
    (0 on unused rows); valid_R: bool; tile_expert_Rt: int32 global expert of each of the R / T
    tiles, -1 for a tile no expert uses.
    """

    token_R: jax.Array
    gate_R: jax.Array
    valid_R: jax.Array
    tile_expert_Rt: jax.Array


def pack(dispatches: tuple[Dispatch, ...], n_rows: int, tile_rows: int) -> Packing:
    """Lays out the valid slots of all expert groups' dispatches (one routing group) in
    `n_rows` rows, expert-major (group 0's experts first), each expert's run tile-aligned.

    1. Count each expert's valid slots; pad each count up to a multiple of T; the exclusive
       cumulative sum of the padded counts is each expert's first row.
    2. A valid slot's row = its expert's first row + its rank among the expert's valid slots;
       invalid slots go to row `n_rows` and are dropped by the scatter (they hold no token).
    3. A tile belongs to the expert whose padded run covers its first row, else to none (-1).
    """
    count_S = jnp.concatenate([jnp.sum(d.valid_ExC, axis=1, dtype=jnp.int32) for d in dispatches])
    padded_S = -(-count_S // tile_rows) * tile_rows
    end_S = jnp.cumsum(padded_S)
    start_S = end_S - padded_S
    rows, tokens, gates, first = [], [], [], 0
    for d in dispatches:  # expert groups differ in C: flatten each, then concatenate
        n_experts = d.valid_ExC.shape[0]
        rank_ExC = jnp.cumsum(d.valid_ExC, axis=1, dtype=jnp.int32) - 1
        start_Ex1 = start_S[first : first + n_experts, None]
        rows.append(jnp.where(d.valid_ExC, start_Ex1 + rank_ExC, n_rows).reshape(-1))
        tokens.append(d.token_index_ExC.reshape(-1))
        gates.append(d.gate_ExC.reshape(-1))
        first += n_experts
    row_X = jnp.concatenate(rows)
    token_R = jnp.zeros((n_rows,), jnp.int32).at[row_X].set(jnp.concatenate(tokens), mode="drop")
    gate_R = jnp.zeros((n_rows,), jnp.float32).at[row_X].set(jnp.concatenate(gates), mode="drop")
    valid_R = jnp.zeros((n_rows,), bool).at[row_X].set(True, mode="drop")
    tile_start_Rt = jnp.arange(0, n_rows, tile_rows, dtype=jnp.int32)
    expert_Rt = jnp.searchsorted(end_S, tile_start_Rt, side="right").astype(jnp.int32)
    tile_expert_Rt = jnp.where(expert_Rt < count_S.shape[0], expert_Rt, -1)
    return Packing(token_R, gate_R, valid_R, tile_expert_Rt)


def combine(out_RxD: jax.Array, packing: Packing, n_tokens: int) -> jax.Array:
    """y[token] += gate * out over valid rows; float32 sum, returned in float32.

    Rows are masked before weighting, not just by their zero gate: an inf/NaN computed in an
    unused row must reach no token, in the forward pass or the gradient.
    """
    out_RxD = jnp.where(packing.valid_R[:, None], out_RxD.astype(jnp.float32), 0.0)
    weighted_RxD = packing.gate_R[:, None] * out_RxD
    y_NxD = jnp.zeros((n_tokens, out_RxD.shape[-1]), jnp.float32)
    return y_NxD.at[packing.token_R].add(weighted_RxD)


# --- The tile scan ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def grouped_swiglu(
    x_RxD: jax.Array,
    tile_expert_Rt: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
    tile_rows: int,
) -> jax.Array:
    """Each tile of `tile_rows` rows through its expert's SwiGLU; unused tiles (-1) give 0."""
    return _forward(x_RxD, tile_expert_Rt, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, tile_rows)[0]


def _tiles(x_RxD: jax.Array, tile_rows: int) -> jax.Array:
    return x_RxD.reshape(-1, tile_rows, x_RxD.shape[-1])


def _forward(x_RxD, tile_expert_Rt, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, tile_rows):
    def body(_, xs):
        x_TxD, e = xs
        i = jnp.maximum(e, 0)

        def run() -> jax.Array:
            return swiglu(x_TxD, w_gate_ExDxF[i], w_up_ExDxF[i], w_down_ExFxD[i])

        return None, jax.lax.cond(e >= 0, run, lambda: jnp.zeros_like(x_TxD))

    _, y_RtxTxD = jax.lax.scan(body, None, (_tiles(x_RxD, tile_rows), tile_expert_Rt))
    residuals = (x_RxD, tile_expert_Rt, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    return y_RtxTxD.reshape(x_RxD.shape), residuals


def _backward(tile_rows, residuals, dy_RxD):
    """Per used tile: recompute the tile's SwiGLU, then dx and the weight gradients of its
    expert, added in place into the carried [E, ...] accumulators."""
    x_RxD, tile_expert_Rt, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD = residuals

    def body(grads, xs):
        x_TxD, dy_TxD, e = xs
        i = jnp.maximum(e, 0)
        w_gate, w_up, w_down = w_gate_ExDxF[i], w_up_ExDxF[i], w_down_ExFxD[i]

        def run():
            _, vjp = jax.vjp(swiglu, x_TxD, w_gate, w_up, w_down)
            return vjp(dy_TxD.astype(x_TxD.dtype))

        def skip():
            return tuple(jnp.zeros_like(a) for a in (x_TxD, w_gate, w_up, w_down))

        dx_TxD, *dw = jax.lax.cond(e >= 0, run, skip)
        grads = tuple(g.at[i].add(d.astype(g.dtype)) for g, d in zip(grads, dw, strict=True))
        return grads, dx_TxD

    # Accumulated in float32 whatever the compute dtype: a weight sums many tiles' gradients.
    weights = (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    zeros = tuple(jnp.zeros(w.shape, jnp.float32) for w in weights)
    xs = (_tiles(x_RxD, tile_rows), _tiles(dy_RxD, tile_rows), tile_expert_Rt)
    grads, dx_RtxTxD = jax.lax.scan(body, zeros, xs)
    grads = tuple(g.astype(w.dtype) for g, w in zip(grads, weights, strict=True))
    return (dx_RtxTxD.reshape(x_RxD.shape), None, *grads)


grouped_swiglu.defvjp(_forward, _backward)


# --- The ragged path (GPU) --------------------------------------------------------------------


def row_experts(packing: Packing, tile_rows: int) -> jax.Array:
    """[R] int32 global expert of each valid row, -1 for padding and unused rows."""
    expert_R = jnp.repeat(packing.tile_expert_Rt, tile_rows)
    return jnp.where(packing.valid_R, expert_R, -1)


def ragged_swiglu(
    x_RxD: jax.Array,
    expert_R: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
) -> jax.Array:
    """Each row through its expert's SwiGLU with `jax.lax.ragged_dot` (a grouped GEMM; rows of
    expert -1 give 0 and cost nothing): `model.moe.expert_compute="ragged_dot"`.

    1. Stable-sort the rows by expert (-1 last), so each expert's rows are one contiguous run;
       the group sizes count each expert's rows, and rows past their sum are not computed.
    2. Three ragged dots and the SwiGLU between them, on the sorted rows.
    3. Unsort. Autodiff goes through ragged_dot's own rules.
    """
    n_experts = w_gate_ExDxF.shape[0]
    key_R = jnp.where(expert_R < 0, n_experts, expert_R)
    order_R = jnp.argsort(key_R, stable=True)
    sizes_E = jnp.bincount(key_R, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    x_sorted = x_RxD[order_R]
    gate = jax.lax.ragged_dot(x_sorted, w_gate_ExDxF, sizes_E)
    up = jax.lax.ragged_dot(x_sorted, w_up_ExDxF, sizes_E)
    y_sorted = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_ExFxD, sizes_E)
    return jnp.zeros_like(y_sorted).at[order_R].set(y_sorted)
