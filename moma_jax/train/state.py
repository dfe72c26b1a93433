"""Train state, optimizer, and the abstract -> sharded -> jitted initialisation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.tree_util import GetAttrKey

from moma_jax.config import ExperimentConfig, OptimConfig
from moma_jax.model import Transformer
from moma_jax.model.aux_router import PATH_NAME as AUX_PATH_NAME
from moma_jax.sharding import tree_shardings
from moma_jax.train.controls import initial


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes: a pytree, saved whole by Orbax. `controls`: the adapted
    loss coefficients (`train/controls.py`), {} for most models."""

    step: jax.Array
    params: nnx.State
    opt_state: Any
    controls: dict[str, jax.Array]

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)


def _flatten(state: TrainState):
    """Children by field name; `controls` only when a model has some, so a state without them
    has the layout checkpoints had before the field existed (and they restore unchanged)."""
    names = ("step", "params", "opt_state") + (("controls",) if state.controls else ())
    return [(GetAttrKey(n), getattr(state, n)) for n in names], bool(state.controls)


def _unflatten(has_controls: bool, children) -> TrainState:
    step, params, opt_state, *rest = children
    return TrainState(step, params, opt_state, rest[0] if has_controls else {})


jax.tree_util.register_pytree_with_keys(TrainState, _flatten, _unflatten)


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warm-up from 0 to peak, then linear decay to end_lr_fraction * peak at total_steps."""
    warmup = optax.linear_schedule(0.0, cfg.peak_lr, cfg.warmup_steps)
    decay = optax.linear_schedule(
        cfg.peak_lr, cfg.peak_lr * cfg.end_lr_fraction, cfg.total_steps - cfg.warmup_steps
    )
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def _decay_mask(params: nnx.State) -> nnx.State:
    """Weight decay on matrices only; norm scales and biases are not decayed."""
    return jax.tree.map(
        lambda v: v.replace("norm" not in (v.get_metadata().get("out_sharding") or ())),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def _adamw(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.adamw(
        lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=_decay_mask,
    )  # fmt: skip


def is_aux_path(path) -> bool:
    """Whether a parameter path lies inside an auxiliary router (`model/aux_router.py`)."""
    return any(getattr(p, "key", getattr(p, "name", p)) == AUX_PATH_NAME for p in path)


def param_labels(params: nnx.State) -> nnx.State:
    """ "aux" for the auxiliary routers' parameters, "main" for every other."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace("aux" if is_aux_path(path) else "main"),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_optimizer(cfg: OptimConfig, aux_routers: str = "none") -> optax.GradientTransformation:
    """Clipping by global norm, then AdamW. With aux routers (`model.aux_routers`) they get
    their own branch (`optax.multi_transform`): "joint" leaves the main parameters' clipping
    and update exactly as without them; "posthoc" freezes the main parameters (no moments)."""
    main = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), _adamw(cfg))
    if aux_routers == "none":
        return main
    if aux_routers == "posthoc":
        main = optax.set_to_zero()
    aux = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), _adamw(cfg))
    return optax.multi_transform({"main": main, "aux": aux}, param_labels)


def build_model(cfg: ExperimentConfig) -> Transformer:
    return Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.run.param_seed))


def abstract_params(cfg: ExperimentConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and parameter shapes, without allocating anything."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    return graphdef, params


def fresh_state(
    cfg: ExperimentConfig, params: nnx.State, tx: optax.GradientTransformation
) -> TrainState:
    """Step 0 with `params`: fresh optimizer moments and initial loss coefficients."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), controls=initial(cfg))


def init_state(cfg: ExperimentConfig, tx: optax.GradientTransformation, mesh: Mesh):
    """Returns (graphdef, init_fn, abstract_state, state_shardings).

    `init_fn()` materialises the state directly into its shardings (never unsharded on one
    device); `abstract_state` carries the shardings and is the Orbax restore target.

    Why not `nnx.get_abstract_model`: it abstracts the model alone, with `out_sharding` read as
    mesh axes; the restore target and the jitted init need the whole TrainState (optimizer
    moments included) under the logical-axis table of `sharding.tree_shardings`.
    """
    graphdef, _ = abstract_params(cfg)

    def init() -> TrainState:
        params = nnx.state(build_model(cfg))
        return fresh_state(cfg, params, tx)

    shapes = jax.eval_shape(init)
    shardings = tree_shardings(shapes, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    return graphdef, jax.jit(init, out_shardings=shardings), abstract, shardings
