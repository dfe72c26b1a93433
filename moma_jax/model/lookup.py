"""The token-embedding lookup under the mesh: each shard looks up rows of its own table slice and
the activations leave laid out like the residual stream.

The table is sharded [vocab over `tensor`, embed over `fsdp`] and the tokens [batch over `data`,
`fsdp`, `expert`]. Left to XLA, `jnp.take` handles a pure-FSDP mesh well (two all-to-alls) but on
a mesh that also shards the batch over another axis and the vocabulary over `tensor` it cannot
bring the gather's output ([B, L, D/fsdp], batch replicated) to the residual stream's layout and
replicates the micro-batch's whole [B, L, D] activation on every device ("Involuntary full
rematerialization": at dense_1.4b on data=4,fsdp=4,tensor=4, a 1 GiB f32 gather per device and
micro-batch). `embed` says what to do instead, in one `jax.shard_map`:

1. all-gather the token ids over the table's embed axes (integers: the cheap direction), so each
   shard holds its fsdp group's tokens;
2. look them up in the local slice [V/tensor, D/fsdp]: rows outside the slice's vocabulary range
   are zero, and a sum over `tensor` completes them (Megatron's vocab-parallel embedding);
3. one tiled all-to-all over the embed axes returns each shard its own tokens with the full D.

The bytes moved per device are the micro-batch's own [b, L, D] activations (the sum and the
all-to-all), in the compute dtype; the gradient is the same path transposed (all-to-all back,
scatter-add into the local slice). Ids outside [0, V) give what `jnp.take` gives (negative ones
count from the end, the others a NaN row). Without a mesh, or where the batch's shards do not
contain the table's embed axes (a batch its axes do not divide), it is `jnp.take`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moma_jax.sharding import logical_spec


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _name(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def embed(table_VxD: jax.Array, tokens_BxL: jax.Array, dtype) -> jax.Array:
    """table[tokens] as `dtype`, [B, L, D] with B over the batch axes and D whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return jnp.take(table_VxD, tokens_BxL, axis=0).astype(dtype)
    table_spec = logical_spec(("vocab", "embed"), table_VxD.shape, mesh)
    token_spec = logical_spec(("batch", "length"), tokens_BxL.shape, mesh)
    vocab, width, batch = _axes(table_spec[0]), _axes(table_spec[1]), _axes(token_spec[0])
    if not set(width) <= set(batch) or set(vocab) & set(batch):
        return jnp.take(table_VxD, tokens_BxL, axis=0).astype(dtype)

    n_vocab = table_VxD.shape[0]

    def local(table_vxd, tokens_bxl):
        if width:  # 1. this fsdp group's tokens
            tokens_bxl = jax.lax.all_gather(tokens_bxl, _name(width), axis=0, tiled=True)
        # jnp.take's rule for ids outside [0, V): negative ones count from the end, the rest NaN.
        tokens_bxl = jnp.where(tokens_bxl < 0, tokens_bxl + n_vocab, tokens_bxl)
        known = (tokens_bxl >= 0) & (tokens_bxl < n_vocab)
        ids = tokens_bxl
        if vocab:  # 2. rows in this shard's vocabulary range
            ids = tokens_bxl - jax.lax.axis_index(_name(vocab)) * table_vxd.shape[0]
        inside = (ids >= 0) & (ids < table_vxd.shape[0])
        rows = jnp.take(table_vxd, jnp.clip(ids, 0, table_vxd.shape[0] - 1), axis=0)
        # One select over the rows: other shards' vocabulary is 0 (the sum completes it), an
        # unknown id NaN on every shard (the sum keeps it NaN).
        fill = jnp.where(known, 0.0, jnp.nan).astype(table_vxd.dtype)[..., None]
        rows = jnp.where(inside[..., None], rows, fill).astype(dtype)
        if vocab:
            rows = jax.lax.psum(rows, _name(vocab))
        if width:  # 3. own tokens, full width
            rows = jax.lax.all_to_all(rows, _name(width), split_axis=0, concat_axis=2, tiled=True)
        return rows

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(table_spec, token_spec),
        out_specs=PartitionSpec(token_spec[0], None, None),
    )(table_VxD, tokens_BxL)
