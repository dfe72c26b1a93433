"""The device mesh and the one table that maps logical axis names to mesh axes."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moma_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis (named in model code) -> mesh axis or axes. Model code never names mesh axes.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
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


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
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
            axes = leaf.get_metadata().get("out_sharding") or (None,) * len(leaf.shape)
            return leaf.replace(NamedSharding(mesh, logical_spec(tuple(axes), leaf.shape, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch are split over the data-parallel axes; each row stays whole."""
    return NamedSharding(mesh, logical_spec(("batch", "length"), (0, 0), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
