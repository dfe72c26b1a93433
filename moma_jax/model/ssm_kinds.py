"""The state-space layer kinds: rows of the layer-kind table (`model/kinds.py`) whose token mixer
is a Mamba mixer (`model/mamba.py`) instead of attention. Each is the shared residual `Block`
with the mixer in the attention slot and a feed-forward after it, like every built-in kind, so
a kind is FLOP-matched to `dense` by the mixer's width alone (`model.mamba.expand`):

    mamba      Mamba mixer + SwiGLU (Mamba with the Transformer's FFN, as in Jamba's Mamba
               layers and MoE-Mamba's dense baseline)
    mom        Mixture-of-Mamba (arXiv 2501.16295): the mixer's in/x/dt/out projections per
               modality, conv1d, A and D shared; the norms and the SwiGLU shared, so it differs
               from `mamba` only where the paper unties
    mamba_moe  Mamba mixer + the sparse FFN of `model.moe` (MoMa's modality groups): MoE-Mamba
               (Pioro et al. 2024, arXiv 2401.04081), which alternates Mamba and MoE sublayers

They carry a recurrent state between decode calls (`mamba.RecurrentState`) and no KV cache.
None is wrapped by Mixture-of-Depths (a skipped token would leave a hole in the recurrence).
"""

from __future__ import annotations

from flax import nnx

from moma_jax import flops as flops_lib
from moma_jax.config import ModelConfig
from moma_jax.model import kinds, mamba
from moma_jax.model.block import Block
from moma_jax.model.layers import RMSNorm, SwiGLU
from moma_jax.model.moe import SparseFFN


def _mamba_block(cfg: ModelConfig, ffn: nnx.Module, rngs: nnx.Rngs, untied: bool) -> Block:
    return Block(
        cfg,
        ffn=ffn,
        attn=mamba.MambaMixer(cfg, rngs=rngs, untied=untied),
        attn_norm=RMSNorm(cfg.d_model, cfg),
        ffn_norm=RMSNorm(cfg.d_model, cfg),
    )


def mamba_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """A Mamba mixer, one SwiGLU."""
    return _mamba_block(cfg, SwiGLU(cfg, rngs=rngs), rngs, untied=False)


def mom_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """Mixture-of-Mamba: the mixer's projections per modality, one SwiGLU."""
    return _mamba_block(cfg, SwiGLU(cfg, rngs=rngs), rngs, untied=True)


def mamba_sparse_block(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """A Mamba mixer, the sparse FFN of `model.moe`."""
    return _mamba_block(cfg, SparseFFN(cfg, rngs=rngs), rngs, untied=False)


def recurrent_decode_state(cfg: ModelConfig, batch: int, length: int) -> dict:
    """A Mamba layer's decode state (`mamba.empty_state`): its size is independent of length."""
    return mamba.empty_state(cfg, batch)


_MIXER_AXES = ("embed", "mlp", "norm")


def _rules(*axes: str) -> dict[str, str | tuple[str, ...] | None]:
    """The rows' sharding: the mixer's channels (Di) over "tensor", like the FFN hidden (each
    channel's conv and scan are independent), the rest as the library maps them."""
    return {mamba.INNER: "tensor", **kinds.sharding_rules(*axes)}


kinds.register_layer_kind(
    "mamba",
    kinds.LayerKind(
        build=mamba_block,
        flops=flops_lib.mamba_layer_flops,
        sharding=_rules(*_MIXER_AXES),
        decode_state=recurrent_decode_state,
        decode_cache=mamba.RecurrentState,
    ),
)
kinds.register_layer_kind(
    "mom",
    kinds.LayerKind(
        build=mom_block,
        flops=flops_lib.mamba_layer_flops,
        sharding=_rules(*_MIXER_AXES, "modality"),
        decode_state=recurrent_decode_state,
        decode_cache=mamba.RecurrentState,
        reads_modality_shares=True,
    ),
)
kinds.register_layer_kind(
    "mamba_moe",
    kinds.LayerKind(
        build=mamba_sparse_block,
        flops=flops_lib.mamba_sparse_layer_flops,
        sharding=_rules(*_MIXER_AXES, "expert"),
        decode_state=recurrent_decode_state,
        decode_cache=mamba.RecurrentState,
        reads_modality_shares=True,
        sparse_ffn=True,
        needs_aux_routers=kinds.LAYER_KINDS["moe"].needs_aux_routers,
        describe=kinds.LAYER_KINDS["moe"].describe,
        aux_routers=kinds.LAYER_KINDS["moe"].aux_routers,
    ),
)
