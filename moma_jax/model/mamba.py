"""The Mamba mixer (Gu & Dao 2023, arXiv 2312.00752) and Mixture-of-Mamba (Liang et al. 2025,
arXiv 2501.16295), in the token-mixing slot of the shared `Block` (model/ssm_kinds.py).

    [u, z] = x W_in                          in_proj, D -> 2 Di
    u = silu(conv1d(u))                       depthwise, causal, width W, within the document
    [r, B, C] = u W_x                         x_proj, Di -> Dr + 2 Ds
    delta = softplus(r W_dt + b_dt)           dt_proj, Dr -> Di
    y = selective_scan(u, delta, A, B, C, D)  model/ssm.py, A = -exp(A_log)
    out = (y * silu(z)) W_out                 out_proj, Di -> D

Mixture-of-Mamba unties W_in, W_x, W_dt (with b_dt) and W_out by modality and shares the conv,
A_log and D (its paper's Section 3 and Weixin-Liang/Mixture-of-Mamba `MixtureOfMamba.py`):
`MambaMixer(..., untied=True)` stacks those four on a leading modality axis and runs each token
through its own modality's slice only (`mot.by_modality`, as MoT's projections).

Decoding carries a `RecurrentState` per layer (the SSM state, the last W-1 conv inputs and
their segment ids), so a chunk of tokens continues exactly where the previous call stopped and
cached decoding equals the full forward pass.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ModelConfig
from moma_jax.modality import N_MODALITIES
from moma_jax.model import ssm
from moma_jax.model.context import Context
from moma_jax.model.layers import annotated, decode_sliced, param
from moma_jax.model.mot import by_modality

INNER = "ssm_inner"  # the logical axis of the Di channels (sharded like the FFN hidden)


def empty_state(cfg: ModelConfig, batch: int) -> dict[str, jax.Array]:
    """One layer's decode state: the SSM state ssm [B, Di, Ds] (float32), the last W-1 conv
    inputs conv [B, W-1, Di] (compute dtype) and their segment ids segment [B, W-1]
    (`ssm.NO_SEGMENT`: empty)."""
    mb, d = cfg.mamba, cfg.d_model
    di, wp = mb.d_inner(d), mb.d_conv - 1
    return {
        "ssm": jnp.zeros((batch, di, mb.d_state), jnp.float32),
        "conv": jnp.zeros((batch, wp, di), jnp.dtype(cfg.compute_dtype)),
        "segment": jnp.full((batch, wp), ssm.NO_SEGMENT, jnp.int32),
    }


class RecurrentState:
    """One Mamba layer's decode state for one traced forward pass (`ctx.kv` when decoding; the
    cache index is not needed: the state is the whole past). `update` replaces the arrays;
    `arrays` are what the pass returns."""

    def __init__(self, arrays: dict[str, jax.Array], index: jax.Array | None = None):
        self.ssm_BxDixDs = arrays["ssm"]
        self.conv_BxWpxDi = arrays["conv"]
        self.segment_BxWp = arrays["segment"]

    def update(self, ssm_BxDixDs: jax.Array, conv_BxWpxDi: jax.Array, segment_BxWp: jax.Array):
        self.ssm_BxDixDs = ssm_BxDixDs.astype(self.ssm_BxDixDs.dtype)
        self.conv_BxWpxDi = conv_BxWpxDi.astype(self.conv_BxWpxDi.dtype)
        self.segment_BxWp = segment_BxWp.astype(self.segment_BxWp.dtype)

    def arrays(self) -> dict[str, jax.Array]:
        return {"ssm": self.ssm_BxDixDs, "conv": self.conv_BxWpxDi, "segment": self.segment_BxWp}


def _dt_bias(key: jax.Array, shape: tuple[int, ...], dt_min: float, dt_max: float) -> jax.Array:
    """Mamba's delta bias: softplus(bias) log-uniform in [dt_min, dt_max] (floored at 1e-4),
    stored as its softplus inverse dt + log(-expm1(-dt))."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    dt = jnp.exp(jax.random.uniform(key, shape) * (hi - lo) + lo)
    dt = jnp.maximum(dt, 1e-4)
    return dt + jnp.log(-jnp.expm1(-dt))


def _linear(x_TxX: jax.Array, w_XxY: jax.Array) -> jax.Array:
    return jnp.dot(x_TxX, w_XxY)


def _affine(x_TxX: jax.Array, w_XxY: jax.Array, b_Y: jax.Array) -> jax.Array:
    return jnp.dot(x_TxX, w_XxY) + b_Y


class MambaMixer(nnx.Module):
    """The mixer of the module docstring, (x_BxLxD, ctx) -> y_BxLxD. `untied`: W_in, W_x, W_dt,
    b_dt and W_out per modality (Mixture-of-Mamba); conv, A_log and D shared either way.

    Initialisation follows Mamba: projections normal(init_std), W_dt uniform(+-Dr^-0.5),
    b_dt by `_dt_bias`, conv uniform(+-W^-0.5) (PyTorch's Conv1d default), A_log = log(1..Ds)
    (S4D-real), D = 1. Biases, A_log and D carry the "norm" logical axis, which keeps them out
    of weight decay (`train/state.py`), as Mamba's `_no_weight_decay`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, untied: bool = False):
        mb, d, std, pdt = cfg.mamba, cfg.d_model, cfg.init_std, cfg.param_dtype
        di, ds, dr, w = mb.d_inner(d), mb.d_state, mb.resolved_dt_rank(d), mb.d_conv
        m = (N_MODALITIES,) if untied else ()
        mod = ("modality",) if untied else ()
        self.untied, self.cfg = untied, cfg
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.dims = (di, ds, dr)
        # Shapes (a leading M when untied): w_in [D, 2, Di] (u and z), w_x [Di, Dr + 2 Ds],
        # w_dt [Dr, Di], b_dt [Di], w_out [Di, D].
        self.w_in = param(rngs, (*m, d, 2, di), (*mod, "embed", None, INNER), std, pdt)
        self.w_x = param(rngs, (*m, di, dr + 2 * ds), (*mod, INNER, None), std, pdt)
        bound = dr**-0.5
        w_dt = jax.random.uniform(rngs.params(), (*m, dr, di), minval=-bound, maxval=bound)
        self.w_dt = annotated(w_dt.astype(pdt), (*mod, None, INNER))
        b_dt = _dt_bias(rngs.params(), (*m, di), mb.dt_min, mb.dt_max)
        self.b_dt = annotated(b_dt.astype(pdt), (*mod, "norm"))
        self.w_out = param(rngs, (*m, di, d), (*mod, INNER, "embed"), std, pdt)
        if untied:  # decoding reads the present modality's slices only (`by_modality`)
            decode_sliced(self.w_in, self.w_x, self.w_dt, self.b_dt, self.w_out)
        bound = w**-0.5
        conv_w = jax.random.uniform(rngs.params(), (w, di), minval=-bound, maxval=bound)
        conv_b = jax.random.uniform(rngs.params(), (di,), minval=-bound, maxval=bound)
        self.conv_w_WxDi = annotated(conv_w.astype(pdt), (None, INNER))
        self.conv_b_Di = annotated(conv_b.astype(pdt), ("norm",))
        a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, ds + 1, dtype=jnp.float32), (di, ds)))
        self.a_log_DixDs = annotated(a_log.astype(pdt), (INNER, "norm"))
        self.d_Di = annotated(jnp.ones((di,), jnp.dtype(pdt)), ("norm",))

    def _project(self, x_BxLxX: jax.Array, ctx: Context, *weights: nnx.Param) -> jax.Array:
        """x through a projection (and bias): the shared one, or each token's modality's
        (`mot.by_modality`: only that modality's rows are computed); float32."""
        dt = self.compute_dtype
        if self.untied:  # [(U,) M, X, Y]: stacked over the units in a decode step (Context.unit)
            decoding = ctx.decode_step(x_BxLxX.shape[1])
            # decoding casts each chosen slice as it reads it; training casts first, as always
            ws = [w[...] if decoding else w[...].astype(dt) for w in weights]
            lead = 2 if ctx.unit is None else 3
            ws[0] = ws[0].reshape(*ws[0].shape[:lead], -1)
            fn = _affine if len(ws) == 2 else _linear
            x = x_BxLxX.astype(dt)
            return by_modality(fn, x, ctx.modality, tuple(ws), self.cfg, decoding, ctx.unit)
        ws = [w[...].astype(dt) for w in weights]
        w = ws[0].reshape(ws[0].shape[0], -1)
        y = jnp.einsum("blx,xy->bly", x_BxLxX.astype(dt), w, preferred_element_type=jnp.float32)
        return y if len(ws) == 1 else y + ws[1].astype(jnp.float32)

    def __call__(self, x_BxLxD: jax.Array, ctx: Context) -> jax.Array:
        dt, (di, ds, dr) = self.compute_dtype, self.dims
        b = x_BxLxD.shape[0]
        wp = self.conv_w_WxDi.shape[0] - 1
        uz_BxLx2Di = self._project(x_BxLxD, ctx, self.w_in)
        u_BxLxDi, z_BxLxDi = uz_BxLx2Di[..., :di].astype(dt), uz_BxLx2Di[..., di:]
        state = ctx.kv
        if state is None:  # a whole row: nothing before it
            window_BxWpxDi = jnp.zeros((b, wp, di), dt)
            window_segment_BxWp = jnp.full((b, wp), ssm.NO_SEGMENT, jnp.int32)
            h0_BxDixDs = jnp.zeros((b, di, ds), jnp.float32)
        else:
            assert isinstance(state, RecurrentState)
            window_BxWpxDi, window_segment_BxWp = state.conv_BxWpxDi, state.segment_BxWp
            h0_BxDixDs = state.ssm_BxDixDs
        segment_BxL = ctx.segment_ids.astype(jnp.int32)
        conv_BxLxDi = ssm.segment_conv(
            u_BxLxDi,
            segment_BxL,
            self.conv_w_WxDi[...].astype(dt),
            self.conv_b_Di[...].astype(dt),
            window_BxWpxDi,
            window_segment_BxWp,
        )
        conv_BxLxDi = jax.nn.silu(conv_BxLxDi)
        rbc_BxLxP = self._project(conv_BxLxDi, ctx, self.w_x)
        r_BxLxDr = rbc_BxLxP[..., :dr]
        b_BxLxDs, c_BxLxDs = rbc_BxLxP[..., dr : dr + ds], rbc_BxLxP[..., dr + ds :]
        delta_BxLxDi = jax.nn.softplus(self._project(r_BxLxDr, ctx, self.w_dt, self.b_dt))
        starts_BxL = ssm.document_starts(segment_BxL, window_segment_BxWp[:, -1])
        a_DixDs = -jnp.exp(self.a_log_DixDs[...].astype(jnp.float32))
        y_BxLxDi, h_BxDixDs = ssm.selective_scan(
            conv_BxLxDi,
            delta_BxLxDi,
            a_DixDs,
            b_BxLxDs,
            c_BxLxDs,
            self.d_Di[...],
            starts_BxL,
            h0_BxDixDs,
            self.cfg.mamba.scan,
        )
        y_BxLxDi = y_BxLxDi * jax.nn.silu(z_BxLxDi.astype(jnp.float32))
        if state is not None:
            all_u = jnp.concatenate([window_BxWpxDi.astype(dt), u_BxLxDi], axis=1)
            all_segment = jnp.concatenate([window_segment_BxWp, segment_BxL], axis=1)
            state.update(h_BxDixDs, all_u[:, -wp:], all_segment[:, -wp:])
        return self._project(y_BxLxDi.astype(dt), ctx, self.w_out).astype(dt)
