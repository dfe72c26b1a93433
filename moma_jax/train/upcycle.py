"""`--init-from` (`run.init_from`): start a run from another run's latest checkpoint. What it
means is set by the target experiment:

- sparse upcycling (MoMa 2.1), any target without `model.aux_routers="posthoc"`: a run with
  many experts starts from a run with one per group, as below;
- an aux-router stage (`model.aux_routers="posthoc"`, `{arch}_aux_{size}`): the source is the
  same model without aux routers; every parameter is loaded unchanged (no expansion allowed)
  and frozen by the optimizer (`train/state.make_optimizer`); only the aux routers train.

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
from moma_jax.train.state import is_aux_path
from moma_jax.train.workdir import Workdir

# Keys the target may change relative to the source: the expert layout, the router and the
# schedule; everything else (shapes, data) must match for the copy and the data position to
# mean the same thing.
_MAY_DIFFER = ("name", "description", "model.moe.", "model.aux_routers", "optim.", "run.", "mesh.")
# An aux-router stage keeps the model exactly (its routers included).
_MAY_DIFFER_AUX = ("name", "description", "model.aux_routers", "optim.", "run.", "mesh.")


def load_source(source: Workdir, cfg: ExperimentConfig) -> ExperimentConfig:
    """The source run's config, checked against the target's (keys outside `_MAY_DIFFER`)."""
    saved = source.read_config()
    if saved is None:
        raise ConfigError(
            f"--init-from {source}: no run there (no {source.config_file.name}); train it first"
        )
    may_differ = _MAY_DIFFER_AUX if cfg.model.aux_routers == "posthoc" else _MAY_DIFFER
    differ = config_diff(saved, cfg, lambda key: key.startswith(may_differ))
    if differ:
        raise ConfigError(
            f"--init-from {source}: the source run differs in keys that must match:\n  "
            + "\n  ".join(differ)
        )
    return saved


def upcycle_params(source: nnx.State, target: nnx.State, exact: bool = False) -> nnx.State:
    """Target parameters filled from the source as described in the module docstring
    (`exact`: an aux-router stage, every parameter outside the aux routers copied unchanged)."""
    src = dict(nnx.to_flat_state(source))
    out = []
    for path, var in nnx.to_flat_state(target):
        name = "/".join(map(str, path))
        if path not in src:
            if exact and not is_aux_path(path):
                raise ConfigError(f"--init-from: the source run has no parameter {name}")
            out.append((path, var))
            continue
        value = src[path][...]
        axes = var.get_metadata().get("out_sharding") or ()
        if exact and value.shape != var.shape:
            raise ConfigError(
                f"--init-from: an aux-router stage loads {name} unchanged, but the source's "
                f"shape is {value.shape} and this model's {var.shape}"
            )
        if value.shape != var.shape:
            e = axes.index("expert") if "expert" in axes else None
            if e is None or value.shape[e] != 1:
                raise ConfigError(
                    f"cannot upcycle {name}: source shape {value.shape}, target {var.shape}"
                )
            value = jnp.broadcast_to(value, var.shape)
        out.append((path, var.replace(value.astype(var.dtype))))
    return nnx.from_flat_state(out)


def upcycled_state(
    target_params: nnx.State, source_params: nnx.State, shardings, exact: bool = False
) -> nnx.State:
    """Upcycled (or, `exact`, loaded) parameters placed in the target's shardings."""
    return jax.device_put(upcycle_params(source_params, target_params, exact), shardings)
