"""What a layer receives beside x (`Context`: the batch's per-token data and the forward pass's
modes), and what a layer unit returns beside x (`UnitAux`).

`Context` is a frozen pytree: the arrays are its leaves; the modes (causal routing, capture)
and the decode cache object are static fields, so a layer branches on them in Python and a
scanned or rematerialised body traces once per mode. Layers make variants with `replace`
(a Mixture-of-Depths layer hands its inner block the selected tokens' positions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from moma_jax.model.cache import KVCache


def _static(default: Any) -> Any:
    """A field that is part of the tree's structure (hashed), not a leaf."""
    return dataclasses.field(default=default, metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
    """positions, segment_ids (0: padding), modality: [B, L] per token.

    attn_mask: [B, 1, L, L] segment-aware causal mask (None when decoding: `kv` masks).
    keep: [B, L] the tokens present in this layer (None: the real tokens); a causal
        Mixture-of-Depths layer passes its chosen tokens to its inner block.
    routing_key: router noise for this layer unit (None: evaluation, no noise).
    cache_index: decoding: how many tokens every row of the cache holds.
    kv: decoding: this block's decode state, set per block by the unit: a KV cache
        (`model/cache.py`) for attention, a `model.mamba.RecurrentState` for a Mamba mixer.
    causal: each token routes alone (aux routers, `model/aux_router.py`) instead of the
        training routers, which see the routing group.
    capture: layers add their routing decisions to aux["capture"] (`analysis.route`).
    unit: a one-token decode step: the index of this layer unit in the stack. The weights a
        step reads one slice at a time (`layers.decode_sliced`: an expert's, a modality's)
        reach the layer still stacked over the units, [U, E, ...], and the step reads
        [unit, e]: sliced per layer first, XLA:CPU would copy the layer's whole [E, ...] block
        out of the stack on every step (docs/benchmarks.md, 2026-12-07).
    """

    positions: jax.Array
    segment_ids: jax.Array
    modality: jax.Array
    attn_mask: jax.Array | None = None
    keep: jax.Array | None = None
    routing_key: jax.Array | None = None
    cache_index: jax.Array | None = None
    unit: jax.Array | None = None
    kv: KVCache | Any = _static(None)
    causal: bool = _static(False)
    capture: bool = _static(False)

    def replace(self, **changes: Any) -> Context:
        return dataclasses.replace(self, **changes)

    def decode_step(self, length: int) -> bool:
        """A one-token step of KV-cached generation (causal routing, no gradient taken): the
        layers run only what the step's tokens chose (`grouped.chosen_experts_apply`)."""
        return self.cache_index is not None and length == 1

    def present(self) -> jax.Array:
        """[B, L] the tokens present in this layer: `keep`, or else the real tokens."""
        return self.segment_ids > 0 if self.keep is None else self.keep


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnitAux:
    """What one layer unit returns beside x; the scan over units stacks every leaf on [U].

    losses: summed over the unit's blocks (added to the objective).
    metrics: averaged over the unit's blocks.
    per_block: {j: block j's own metrics}, for the per-layer report (`metric_names`).
    capture: {j: block j's routing decisions} with `Context.capture`, else {}.
    cache: {j: block j's updated decode state} when decoding, else {}.
    """

    losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]
    per_block: dict[int, dict[str, jax.Array]]
    capture: dict[int, Any]
    cache: dict[int, dict[str, jax.Array]]
