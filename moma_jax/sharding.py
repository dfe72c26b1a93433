"""The device mesh and the one table that maps logical axis names to mesh axes."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from moma_jax.config import ConfigError, ExperimentConfig, MeshConfig
from moma_jax.sparse_config import EXPERT_COMPUTE

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis (named in model code) -> mesh axis or axes. Model code never names mesh axes.
# Outside the expert layers the expert axis shards the batch too; inside them a routing group
# stays on its batch shard and its expert slots travel to the expert's shard (model/exchange.py).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "expert": "expert",
    "modality": None,
    "layers": None,
    "norm": None,
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis filled; an impossible mesh names the failing axis."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    fill = [a for a, s in sizes.items() if s == -1]
    if n_devices % fixed:
        axes = ", ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s not in (1, -1))
        raise ConfigError(
            f"{axes} needs a multiple of {fixed} devices, but {n_devices} are present "
            f"(mesh {sizes}); change the axis sizes (e.g. --set mesh.data=-1 to fill)"
        )
    if fill:
        sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ConfigError(
            f"mesh {sizes} uses {fixed} devices but {n_devices} are present; set one axis to -1"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(jax.devices()) if devices is None else devices
    sizes = mesh_shape(cfg, len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def logical_spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh | AbstractMesh
) -> PartitionSpec:
    """Maps logical names to a PartitionSpec; a dim its mesh axes do not divide is replicated."""
    used: set[str] = set()
    out: list[Any] = []
    for name, dim in zip(axes, shape, strict=True):
        target = LOGICAL_RULES.get(name) if name else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if a not in used and mesh.shape[a] > 1)
        if names and dim % math.prod(mesh.shape[a] for a in names) == 0:
            used.update(names)
            out.append(names[0] if len(names) == 1 else names)
        else:
            out.append(None)
    return PartitionSpec(*out)


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for an abstract pytree: a Variable follows its logical `out_sharding`
    metadata (optimizer moments inherit it from their parameter); other leaves are replicated.

    Why not `nnx.get_named_sharding`: it reads `out_sharding` as mesh axis names, while ours are
    logical names mapped by `LOGICAL_RULES`, with a dimension its mesh axes do not divide
    replicated (`logical_spec`); and it covers Variables only, not the optimizer's other leaves.
    """

    def one(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            if not hasattr(leaf.get_value(), "shape"):  # optax.multi_transform's MaskedNode
                return leaf
            axes = leaf.get_metadata().get("out_sharding") or (None,) * len(leaf.shape)
            return leaf.replace(NamedSharding(mesh, logical_spec(tuple(axes), leaf.shape, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch are split over the data-parallel axes; each row stays whole."""
    return NamedSharding(mesh, logical_spec(("batch", "length"), (0, 0), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_axes(logical: str, mesh: Any) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that a logical axis maps to on `mesh` (concrete or abstract)."""
    target = LOGICAL_RULES.get(logical)
    names = (target,) if isinstance(target, str) else tuple(target or ())
    return tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the mesh of the trace
    (`jax.set_mesh`); a no-op without one, so model code runs the same on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = []
    for name in axes:
        names = mesh_axes(name, mesh) if name else ()
        spec.append(names[0] if len(names) == 1 else (names or None))
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def check_mesh(cfg: ExperimentConfig, sizes: dict[str, int]) -> None:
    """Refuses, before anything compiles, a mesh the experiment cannot use evenly: the
    ConfigError names the config key, the mesh axis and both numbers."""
    d, f, e, t = (sizes[a] for a in MESH_AXES)
    m, data = cfg.model, cfg.data
    shards = d * f * e
    rows = data.batch_size // data.micro_batches
    if m.has_experts:
        if e > 1 and not EXPERT_COMPUTE[m.moe.expert_compute]["expert_parallel"]:
            paths = [name for name, row in EXPERT_COMPUTE.items() if row["expert_parallel"]]
            raise ConfigError(
                f"model.moe.expert_compute={m.moe.expert_compute} has no expert-parallel path; "
                f"with mesh.expert={e} use expert_compute={' or '.join(paths)}"
            )
        for g, n_experts in enumerate(m.moe.group_experts):
            if n_experts > 1 and n_experts % e:  # one-expert groups are replicated
                raise ConfigError(
                    f"expert group {m.moe.group_name(g)} has {n_experts} experts "
                    f"(model.moe.group_experts={m.moe.group_experts}), not divisible by "
                    f"mesh.expert={e}; use an expert axis that divides every group"
                )
    if rows % shards:
        raise ConfigError(
            f"a micro-batch of {rows} rows (data.batch_size={data.batch_size} / "
            f"data.micro_batches={data.micro_batches}) does not split over the batch shards "
            f"mesh.data x mesh.fsdp x mesh.expert = {d}x{f}x{e} = {shards}; make "
            f"data.batch_size a multiple of {shards * data.micro_batches}"
        )
    if m.has_experts:
        per_shard = rows // shards * data.seq_len
        group = m.moe.routing_group_tokens
        if per_shard % group:
            raise ConfigError(
                f"the mesh would split a routing group: each of the {shards} batch shards holds "
                f"{per_shard} tokens per micro-batch, not a multiple of "
                f"model.moe.routing_group_tokens={group}; use fewer batch shards or a larger "
                "data.batch_size, or smaller routing groups"
            )
    for key, value, axis, size in (
        ("model.n_heads", m.n_heads, "tensor", t),
        ("model.ffn_hidden (resolved)", m.resolved_ffn_hidden, "tensor", t),
        *(
            (
                (
                    "an expert's hidden (ffn_hidden / model.moe.granularity)",
                    m.moe.expert_hidden(m.resolved_ffn_hidden),
                    "tensor",
                    t,
                ),
                (
                    "the shared experts' hidden (model.moe.shared_experts x the expert's)",
                    max(1, m.moe.shared_experts) * m.moe.expert_hidden(m.resolved_ffn_hidden),
                    "tensor",
                    t,
                ),
            )
            if m.has_experts
            else ()
        ),  # fmt: skip
        ("model.vocab_size", m.vocab_size, "tensor", t),
        ("model.d_model", m.d_model, "fsdp", f),
    ):
        if value % size:
            raise ConfigError(
                f"{key}={value} is not divisible by mesh.{axis}={size}; change one of them "
                "(model.ffn_multiple_of rounds the FFN hidden size)"
            )
