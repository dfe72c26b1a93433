"""Expert parallelism: each expert's fixed-size slot buffer travels to the shard that owns the
expert, and its outputs travel back (`jax.shard_map` + `jax.lax.all_to_all`).

Outside the expert layers the `expert` mesh axis shards the batch like `data` and `fsdp`, so a
routing group (and its [E, T, D] slot buffer) lives whole on one shard. `to_experts` reshards a
[G, E, T, D] buffer from "G over every batch axis" to "G over the batch axes but `expert`, E
over `expert`" with one tiled all-to-all inside each `expert` group of shards: shard j sends
its groups' slots for expert block i to shard i. The experts then run where their weights live
(weights are sharded over `expert` on their E axis), and `from_experts` is the inverse
all-to-all. Both are the identity without a mesh (one device) or with `mesh.expert` = 1, and for
one-expert groups (their weights are replicated). Shapes stay fixed, so this runs on CPU.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from moma_jax.sharding import mesh_axes


def _plan(n_experts: int):
    """(mesh, batch axes, batch axes without expert), or None when nothing moves."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.shape or mesh.shape["expert"] == 1 or n_experts == 1:
        return None
    batch = mesh_axes("batch", mesh)
    return mesh, batch, tuple(a for a in batch if a != "expert")


def _spec(*axes) -> PartitionSpec:
    return PartitionSpec(*(a if not isinstance(a, tuple) else (a or None) for a in axes))


def to_experts(x_GxExTxD: jax.Array) -> jax.Array:
    """[G, E, T, D]: G over the batch axes -> G over the batch axes but expert, E over expert."""
    return _move(x_GxExTxD, to_experts=True)


def from_experts(y_GxExTxD: jax.Array) -> jax.Array:
    """The inverse of `to_experts`: the outputs back to their routing group's shard."""
    return _move(y_GxExTxD, to_experts=False)


def _move(a_GxExTxD: jax.Array, to_experts: bool) -> jax.Array:
    """One tiled all-to-all over `expert`: E split and G gathered (to the experts), or back."""
    plan = _plan(a_GxExTxD.shape[1])
    if plan is None:
        return a_GxExTxD
    mesh, batch, rest = plan
    by_group, by_expert = _spec(batch), _spec(rest, "expert")
    split, concat = (1, 0) if to_experts else (0, 1)
    return jax.shard_map(
        lambda a: jax.lax.all_to_all(a, "expert", split_axis=split, concat_axis=concat, tiled=True),
        mesh=mesh,
        in_specs=by_group if to_experts else by_expert,
        out_specs=by_expert if to_experts else by_group,
    )(a_GxExTxD)
