"""The key/value cache of one attention layer for decoding one token (or a prompt) at a time.

Every row holds the same number of tokens (`index`); keys are written at positions
[index, index + T). A position is present in a layer only if the token went through it (`keep`:
always for ordinary layers; for a Mixture-of-Depths layer, only the tokens its causal router
took), so the cached attention sees exactly the keys the full causal forward pass sees: same
row, present, not after the query. A query always sees itself, so no row of the softmax is
empty (a skipped token's own output is discarded by its MoD layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def empty(batch: int, length: int, heads: int, head_dim: int, dtype) -> dict[str, jax.Array]:
    """The arrays of one layer's cache: k, v [B, S, H, Dh] and keep [B, S]."""
    kv = jnp.zeros((batch, length, heads, head_dim), dtype)
    return {"k": kv, "v": kv, "keep": jnp.zeros((batch, length), bool)}


class KVCache:
    """One layer's cache arrays and the write position; `append` updates them in place (the
    object lives for one traced forward pass; `arrays` are what it returns)."""

    def __init__(self, arrays: dict[str, jax.Array], index: jax.Array):
        self.k_BxSxHxDh, self.v_BxSxHxDh, self.keep_BxS = arrays["k"], arrays["v"], arrays["keep"]
        self.index = jnp.asarray(index, jnp.int32)

    def append(
        self, k_BxTxHxDh: jax.Array, v_BxTxHxDh: jax.Array, keep_BxT: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Writes the new keys and values; returns all keys, values and the mask [B, 1, T, S]."""
        i, t = self.index, k_BxTxHxDh.shape[1]
        put = jax.lax.dynamic_update_slice_in_dim
        self.k_BxSxHxDh = put(self.k_BxSxHxDh, k_BxTxHxDh.astype(self.k_BxSxHxDh.dtype), i, 1)
        self.v_BxSxHxDh = put(self.v_BxSxHxDh, v_BxTxHxDh.astype(self.v_BxSxHxDh.dtype), i, 1)
        self.keep_BxS = put(self.keep_BxS, keep_BxT.astype(bool), i, 1)
        key_S = jnp.arange(self.keep_BxS.shape[1])
        query_T = i + jnp.arange(t)
        before_TxS = key_S[None, :] <= query_T[:, None]
        own_TxS = key_S[None, :] == query_T[:, None]
        mask_BxTxS = (before_TxS[None] & self.keep_BxS[:, None, :]) | own_TxS[None]
        return self.k_BxSxHxDh, self.v_BxSxHxDh, mask_BxTxS[:, None]

    def arrays(self) -> dict[str, jax.Array]:
        return {"k": self.k_BxSxHxDh, "v": self.v_BxSxHxDh, "keep": self.keep_BxS}
