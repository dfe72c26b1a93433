"""Expert compute with static shapes that drops nothing and runs close to the ideal FLOPs.

Routing (`routing.py`) leaves, per routing group and expert group, a fixed slot buffer per
expert (`Dispatch`, [E, C]) whose valid slots are a prefix: k_e slots for expert choice, with C
the most k_e can ever be (`SparseConfig.group_slots`). These fixed buffers are the unit that
expert parallelism moves between devices. Running all C slots would cost the worst case (every
token of the routing group in this modality); `slab_swiglu` runs only the slots in use:

1. The first F slots of every expert (`SparseConfig.first_slots`: `first_fraction` of k_e at
   the configured modality shares, rounded up to 8) run as one batched SwiGLU over [G, E, F]
   rows with the group's stacked expert weights.
2. The other C - F slots are cut into slabs of T (`SparseConfig.slab_slots`: `tile_rows` shared
   by the group's experts), run by a loop whose trip count is dynamic: the slabs the longest
   valid prefix of any (routing group, expert) reaches (`_slab_loop`, with a hand-written VJP
   that recomputes each slab). So an image-heavy group runs its extra slabs, and
   nothing is dropped; executed rows are max(F, k rounded up to slabs) per expert, at the
   largest k among the routing groups of the micro-batch.
3. `combine_slots`: y[token] += gate * out over valid slots, in float32, per slab.

`ragged_swiglu` is the other way to run the experts (`model.moe.expert_compute="ragged_dot"`):
the valid slots of all groups sorted by expert, one `jax.lax.ragged_dot` per projection, no
padding at all. It measured slower than the slabs wherever it ran (docs/benchmarks.md, "Where
the expert-compute defaults come from"), so it is an option, kept exact by the tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moma_jax.model.exchange import from_experts, to_experts
from moma_jax.model.layers import swiglu
from moma_jax.model.routing import Dispatch


def _pad_slots(dispatch: Dispatch, slots: int) -> Dispatch:
    """[..., E, C] -> [..., E, slots] with invalid slots (token 0, gate 0) appended."""
    extra = slots - dispatch.valid_ExC.shape[-1]
    if extra == 0:
        return dispatch
    widths = [(0, 0)] * (dispatch.valid_ExC.ndim - 1) + [(0, extra)]
    return Dispatch(*(jnp.pad(a, widths) for a in dispatch))


ExpertFn = Callable[..., jax.Array]  # (x_TxDin, *one expert's weights) -> y_TxDout


def slab_swiglu(
    x_GxNxD: jax.Array,
    dispatch: Dispatch,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
    first: int,
    slab: int,
) -> tuple[jax.Array, jax.Array]:
    """`slab_apply` of the SwiGLU: the sparse FFN's expert compute."""
    weights = (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    return slab_apply(swiglu, x_GxNxD, dispatch, weights, first, slab)


def slab_apply(
    fn: ExpertFn,
    x_GxNxD: jax.Array,
    dispatch: Dispatch,
    weights: tuple[jax.Array, ...],
    first: int,
    slab: int,
) -> tuple[jax.Array, jax.Array]:
    """Every valid slot of `dispatch` ([G, E, C]) through `fn` with its expert's weights (each
    of `weights` stacked on a leading E axis), combined back to the tokens.

    1. The first `first` slots of every expert run as one batched call (sized to the k_e of
       a routing group with the configured modality mix: the usual case runs only this).
    2. The remaining slots, in slabs of `slab`, run in a loop whose trip count is the number of
       slabs the longest valid prefix of any (routing group, expert) reaches.
    Returns y [G, N, Dout] (float32: sum of gate * output per token) and the slots per expert
    that ran (int32), for the metrics.
    """
    capacity = dispatch.valid_ExC.shape[-1]
    first = min(first, capacity)
    n_slabs = -(-(capacity - first) // slab)
    dispatch = _pad_slots(dispatch, first + n_slabs * slab)
    y_GxNxD = _slots_out(fn, x_GxNxD, Dispatch(*(a[..., :first] for a in dispatch)), weights)
    if n_slabs == 0:
        return y_GxNxD, jnp.asarray(first, jnp.int32)
    longest = jnp.max(jnp.sum(dispatch.valid_ExC, axis=-1, dtype=jnp.int32))
    used = -(-jnp.maximum(longest - first, 0) // slab)

    def slabs(a: jax.Array) -> jax.Array:  # [G, E, C'] -> [S, G, E, T]
        return jnp.moveaxis(a[..., first:].reshape(*a.shape[:2], n_slabs, slab), 2, 0)

    rest = Dispatch(*(slabs(a) for a in dispatch))
    y_GxNxD = y_GxNxD + _slab_loop(
        fn, x_GxNxD, rest.gate_ExC, rest.token_index_ExC, rest.valid_ExC, used, *weights
    )
    return y_GxNxD, first + used * slab


def _per_expert(fn: ExpertFn, n_weights: int) -> ExpertFn:
    """fn over [G, E, T, D] slots with weights stacked [E, ...], run where the experts live:
    the slots go to their expert's shard and come back (`exchange.py`; the identity on one
    device)."""
    batched = jax.vmap(fn, in_axes=(1, *([0] * n_weights)), out_axes=1)
    return lambda x_GxExTxD, *weights: from_experts(batched(to_experts(x_GxExTxD), *weights))


def _slots_out(fn, x_GxNxD, part: Dispatch, weights) -> jax.Array:
    """Gather the slots' tokens, each expert's `fn`, combine ([G, N, Dout] float32)."""
    x_GxExTxD = jax.vmap(lambda x_NxD, idx: x_NxD[idx])(x_GxNxD, part.token_index_ExC)
    out_GxExTxD = _per_expert(fn, len(weights))(x_GxExTxD, *weights)
    return jax.vmap(lambda o, d: combine_slots(o, d, x_GxNxD.shape[1]))(out_GxExTxD, part)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _slab_loop(fn, x_GxNxD, gate_SxGxExT, token_SxGxExT, valid_SxGxExT, used, *weights):
    """The overflow slabs: a loop of `used` iterations (a dynamic trip count, so slabs past the
    longest prefix cost nothing), with a hand-written VJP: autodiff cannot reverse a loop of
    dynamic length, and a scan with `lax.cond` would store zero residuals for every slab."""
    slabs = (gate_SxGxExT, token_SxGxExT, valid_SxGxExT)
    y_GxNxD, _ = _slab_loop_fwd(fn, x_GxNxD, *slabs, used, *weights)
    return y_GxNxD


def _slab_loop_fwd(fn, x_GxNxD, gate_SxGxExT, token_SxGxExT, valid_SxGxExT, used, *weights):
    def body(s, y):
        part = Dispatch(token_SxGxExT[s], gate_SxGxExT[s], valid_SxGxExT[s])
        return y + _slots_out(fn, x_GxNxD, part, weights)

    probe = Dispatch(token_SxGxExT[0], gate_SxGxExT[0], valid_SxGxExT[0])
    shape = jax.eval_shape(lambda: _slots_out(fn, x_GxNxD, probe, weights))
    y = jax.lax.fori_loop(0, used, body, jnp.zeros(shape.shape, jnp.float32))
    return y, (x_GxNxD, gate_SxGxExT, token_SxGxExT, valid_SxGxExT, used, weights)


def _slab_loop_bwd(fn, residuals, dy_GxNxD):
    """Per slab that ran: recompute its `fn`; the gate gets sum(dy * out), the expert input
    gate * dy through fn's VJP (scatter-added back to tokens), the weights their gradients,
    accumulated in float32."""
    x_GxNxD, gate_SxGxExT, token_SxGxExT, valid_SxGxExT, used, weights = residuals
    per_expert = _per_expert(fn, len(weights))
    gather = jax.vmap(lambda a_NxD, idx: a_NxD[idx])

    def body(s, carry):
        dx_GxNxD, dgate_SxGxExT, dweights = carry
        token, gate, valid = token_SxGxExT[s], gate_SxGxExT[s], valid_SxGxExT[s]
        out, vjp = jax.vjp(per_expert, gather(x_GxNxD, token), *weights)
        dy_GxExTxD = jnp.where(valid[..., None], gather(dy_GxNxD, token), 0.0)
        dgate = jnp.sum(dy_GxExTxD * out.astype(jnp.float32), axis=-1)
        dx_slots, *dw = vjp((gate[..., None] * dy_GxExTxD).astype(out.dtype))
        dx_GxNxD = jax.vmap(lambda d, idx, v: d.at[idx].add(v.astype(d.dtype)))(
            dx_GxNxD, token, dx_slots
        )
        dweights = tuple(a + b.astype(jnp.float32) for a, b in zip(dweights, dw, strict=True))
        return dx_GxNxD, dgate_SxGxExT.at[s].set(dgate), dweights

    init = (
        jnp.zeros(x_GxNxD.shape, jnp.float32),
        jnp.zeros(gate_SxGxExT.shape, jnp.float32),
        tuple(jnp.zeros(w.shape, jnp.float32) for w in weights),
    )
    dx, dgate, dweights = jax.lax.fori_loop(0, used, body, init)
    dweights = tuple(d.astype(w.dtype) for d, w in zip(dweights, weights, strict=True))
    return (dx.astype(x_GxNxD.dtype), dgate.astype(gate_SxGxExT.dtype), None, None, None, *dweights)


_slab_loop.defvjp(_slab_loop_fwd, _slab_loop_bwd)


def combine_slots(out_ExCxD: jax.Array, dispatch: Dispatch, n_tokens: int) -> jax.Array:
    """y[token_index[e, c]] += gate[e, c] * out[e, c] over valid slots; float32 [N, D].

    Slots are masked before weighting, not just by their zero gate: an inf/NaN computed in an
    unused slot must reach no token, in the forward pass or the gradient.
    """
    dispatch = _pad_slots(dispatch, out_ExCxD.shape[-2])
    out = jnp.where(dispatch.valid_ExC[..., None], out_ExCxD.astype(jnp.float32), 0.0)
    weighted_ExCxD = dispatch.gate_ExC[..., None] * out
    d_model = out_ExCxD.shape[-1]
    y_NxD = jnp.zeros((n_tokens, d_model), jnp.float32)
    return y_NxD.at[dispatch.token_index_ExC.reshape(-1)].add(weighted_ExCxD.reshape(-1, d_model))


# --- The decode path --------------------------------------------------------------------------


def chosen_experts_apply(
    fn: ExpertFn,
    x_GxNxD: jax.Array,
    dispatch: Dispatch,
    weights: tuple[jax.Array, ...],
    unit: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Every valid slot of `dispatch` ([G, E, C]) through `fn`, running only the experts that
    hold a valid slot in some routing group: a loop over those experts (a dynamic trip count),
    each reading its own weights, so an expert no token chose costs no matmul and no weight
    read. For one-token steps of causal decoding, where a token's experts are its own choice
    and the slot buffers are tiny: there the batched path reads every expert's weights to fill
    slots that are mostly empty. Same sums as `slab_apply` (each slot's gate * output added to
    its token in float32), in expert order. Forward only (a loop of dynamic length has no
    reverse-mode derivative; decoding needs none). Returns y [G, N, Dout] float32 and the
    number of experts that ran (int32).

    `unit` (`Context.unit`): the weights are still stacked over the layer units, [U, E, ...],
    and expert e reads [unit, e]; so the loop reads the chosen experts' weights straight from
    the stack (sliced per layer first, the whole [E, ...] block would be copied each step).
    Each expert's weights are cast to x's dtype as they are read."""
    chosen_E = jnp.any(dispatch.valid_ExC, axis=(0, 2))
    order_E = jnp.argsort(~chosen_E, stable=True)  # the chosen experts first, in expert order
    count = jnp.sum(chosen_E, dtype=jnp.int32)
    n_tokens = x_GxNxD.shape[1]

    def expert(e: jax.Array | int) -> list[jax.Array]:
        return [(w[e] if unit is None else w[unit, e]).astype(x_GxNxD.dtype) for w in weights]

    def body(i, y_GxNxD):
        e = order_E[i]
        part = Dispatch(*(a[:, e] for a in dispatch))  # [G, C] each
        x_GxCxD = jax.vmap(lambda x_NxD, idx: x_NxD[idx])(x_GxNxD, part.token_index_ExC)
        out_GxCxD = fn(x_GxCxD, *expert(e))
        return y_GxNxD + jax.vmap(combine)(out_GxCxD, *part)

    def combine(out_CxD, token_C, gate_C, valid_C):  # one routing group's slots of expert e
        one = Dispatch(token_C[None], gate_C[None], valid_C[None])
        return combine_slots(out_CxD[None], one, n_tokens)

    probe = jax.eval_shape(lambda: fn(x_GxNxD[:, :1], *expert(0)))
    y = jnp.zeros((*x_GxNxD.shape[:2], probe.shape[-1]), jnp.float32)
    return jax.lax.fori_loop(0, count, body, y), count


# --- The ragged path ---------------------------------------------------------------------------


def ragged_swiglu(
    x_RxD: jax.Array,
    expert_R: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
) -> jax.Array:
    """Each row through its expert's SwiGLU with `jax.lax.ragged_dot` (a grouped GEMM); rows of
    expert -1 give 0 and cost nothing.

    1. Stable-sort the rows by expert (-1 last), so each expert's rows are one contiguous run;
       the group sizes count each expert's rows, and rows past their sum are not computed.
    2. `layers.swiglu` on the sorted rows, its three matmuls as ragged dots.
    3. Unsort. Autodiff goes through ragged_dot's own rules.
    """
    n_experts = w_gate_ExDxF.shape[0]
    key_R = jnp.where(expert_R < 0, n_experts, expert_R)
    order_R = jnp.argsort(key_R, stable=True)
    sizes_E = jnp.bincount(key_R, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    y_sorted = swiglu(
        x_RxD[order_R],
        w_gate_ExDxF,
        w_up_ExDxF,
        w_down_ExFxD,
        matmul=lambda x, w_E: jax.lax.ragged_dot(x, w_E, sizes_E),
    )
    return jnp.zeros_like(y_sorted).at[order_R].set(y_sorted)
