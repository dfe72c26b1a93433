"""Sparse upcycling (MoMa 2.1): start a run with many experts from a run with one per group.

Every parameter of the source run with the same path and shape is copied (embeddings,
attention, norms, head); a source expert stack with one expert, [..., 1, D, F], is copied into
every expert of the target group, [..., E, D, F]; parameters the source lacks (the new routers)
keep their fresh initialisation. The optimizer and the LR schedule start anew (step 0); the data
iterator continues from the source run's position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.overrides import config_diff
from moma_jax.train.workdir import Workdir

# Keys the target may change relative to the source: the expert layout, the router and the
# schedule; everything else (shapes, data) must match for the copy and the data position to
# mean the same thing.
_MAY_DIFFER = ("name", "description", "model.moe.", "optim.", "run.", "mesh.")


def load_source(source: Workdir, cfg: ExperimentConfig) -> ExperimentConfig:
    """The source run's config, checked against the target's (keys outside `_MAY_DIFFER`)."""
    saved = source.read_config()
    if saved is None:
        raise ConfigError(
            f"--init-from {source}: no run there (no {source.config_file.name}); train it first"
        )
    differ = config_diff(saved, cfg, lambda key: key.startswith(_MAY_DIFFER))
    if differ:
        raise ConfigError(
            f"--init-from {source}: the source run differs in keys that must match:\n  "
            + "\n  ".join(differ)
        )
    return saved


def upcycle_params(source: nnx.State, target: nnx.State) -> nnx.State:
    """Target parameters filled from the source as described in the module docstring."""
    src = dict(nnx.to_flat_state(source))
    out = []
    for path, var in nnx.to_flat_state(target):
        if path not in src:
            out.append((path, var))
            continue
        value = src[path][...]
        axes = var.get_metadata().get("out_sharding") or ()
        if value.shape != var.shape:
            e = axes.index("expert") if "expert" in axes else None
            if e is None or value.shape[e] != 1:
                name = "/".join(map(str, path))
                raise ConfigError(
                    f"cannot upcycle {name}: source shape {value.shape}, target {var.shape}"
                )
            value = jnp.broadcast_to(value, var.shape)
        out.append((path, var.replace(value.astype(var.dtype))))
    return nnx.from_flat_state(out)


def upcycled_state(target_params: nnx.State, source_params: nnx.State, shardings) -> nnx.State:
    """Upcycled parameters placed in the target's shardings."""
    return jax.device_put(upcycle_params(source_params, target_params), shardings)
