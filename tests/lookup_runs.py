"""Run in a subprocess with 8 simulated CPU devices (tests/test_distributed.py): the embedding
lookup (model/lookup.py) on meshes that shard its table and its tokens, against NumPy (the rows,
and the table's gradient as a scatter-add); prints one JSON object. No compilation cache, so
XLA's partitioner runs, and logs, every time: the caller reads stderr for "Involuntary full
rematerialization", which `jnp.take` gets on the mixed meshes (printed after the '--- take'
line as the control).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/lookup_runs.py
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from moma_jax.config import MeshConfig
from moma_jax.model.lookup import embed
from moma_jax.sharding import batch_sharding, logical_spec, make_mesh

MESHES = {
    "data=2,fsdp=2,tensor=2": MeshConfig(data=2, fsdp=2, tensor=2),
    "fsdp=2,expert=2,tensor=2": MeshConfig(data=1, fsdp=2, expert=2, tensor=2),
    "fsdp=8": MeshConfig(data=1, fsdp=8),
    "data=8": MeshConfig(data=8),
    "tensor=8": MeshConfig(data=1, tensor=8),
}
V, D, B, L = 64, 16, 16, 8


def placed(mesh, table: np.ndarray, tokens: np.ndarray):
    """The table and the tokens laid out as the train step lays them out on `mesh`."""
    spec = logical_spec(("vocab", "embed"), table.shape, mesh)
    return jax.device_put(table, NamedSharding(mesh, spec)), jax.device_put(
        tokens, batch_sharding(mesh)
    )


def main() -> None:
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    rng = np.random.default_rng(0)
    table = rng.normal(size=(V, D)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, L)).astype(np.int32)
    weight = rng.normal(size=(B, L, D)).astype(np.float32)
    grad_ref = np.zeros_like(table)
    np.add.at(grad_ref, tokens, weight)  # d/dtable of sum(table[tokens] * weight)
    mask = np.zeros((B, L), bool)
    mask[:, :3] = True
    edge = np.broadcast_to(np.array([-1, V, V + 3] + [0] * (L - 3)), (B, L))
    odd_ref = np.asarray(jnp.take(table, np.where(mask, edge, tokens), axis=0))
    assert np.isnan(odd_ref[:, 1:3]).all() and (odd_ref[:, 0] == table[V - 1]).all()
    out = {}
    for name, mesh_cfg in MESHES.items():
        mesh = make_mesh(mesh_cfg)
        with jax.set_mesh(mesh):
            t, ids = placed(mesh, table, tokens)
            rows = jax.jit(lambda t, ids: embed(t, ids, jnp.float32))(t, ids)
            grad = jax.jit(jax.grad(lambda t, ids: jnp.sum(embed(t, ids, jnp.float32) * weight)))(
                t, ids
            )
            # ids outside [0, V) as jnp.take on one device: -1 is row V-1, V and V+3 are NaN.
            _, odd = placed(mesh, table, np.where(mask, edge, tokens).astype(np.int32))
            odd_rows = jax.jit(lambda t, ids: embed(t, ids, jnp.float32))(t, odd)
        out[name] = {
            "odd_ids_as_take": bool(np.array_equal(np.asarray(odd_rows), odd_ref, equal_nan=True)),
            "rows_error": float(np.abs(np.asarray(rows) - table[tokens]).max()),
            "grad_error": float(np.abs(np.asarray(grad) - grad_ref).max()),
            "rows_spec": str(rows.sharding.spec),
        }
    print("--- take", file=sys.stderr, flush=True)
    mesh = make_mesh(MESHES["data=2,fsdp=2,tensor=2"])
    with jax.set_mesh(mesh):
        t, ids = placed(mesh, table, tokens)
        jax.jit(lambda t, ids: jnp.take(t, ids, axis=0), out_shardings=batch_sharding(mesh))(t, ids)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
