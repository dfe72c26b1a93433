"""`--init-from` (`run.init_from`): start a run from another run's latest checkpoint. What it
means is set by the target experiment:

- sparse upcycling (MoMa 2.1), any target without `model.aux_routers="posthoc"`: a run with
  many experts starts from a run with one per group, or from a dense run whose layer pattern
  has `dense` where the target has `moe` (Llama 3 meets MoE, arXiv 2412.09952), as below;
- an aux-router stage (`model.aux_routers="posthoc"`, `{arch}_aux_{size}`): the source is the
  same model without aux routers; every parameter is loaded unchanged (no expansion allowed)
  and frozen by the optimizer (`train/state.make_optimizer`); only the aux routers train.

Every parameter of the source run with the same path and shape is copied (embeddings,
attention, norms, head); a source expert stack with one expert, [..., 1, D, F], is copied into
every expert of the target group, [..., E, D, F]; a dense source's FFN, [..., D, F], is copied
into every expert of every group of the layer (the experts start equal, and a one-expert group,
gate 1, computes the dense FFN exactly); parameters the source lacks (the new routers) keep their
fresh initialisation. The optimizer and the LR schedule start anew (step 0); the data
iterator continues from the source run's position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import COMPILE_KEYS, ConfigError, ExperimentConfig
from moma_jax.overrides import config_diff
from moma_jax.train.state import is_aux_path
from moma_jax.train.workdir import Workdir

# Keys the target may change relative to the source: the expert layout, the router and the
# schedule; everything else (shapes, data) must match for the copy and the data position to
# mean the same thing.
# How the step is compiled (`config.COMPILE_KEYS`) never has to match.
_MAY_DIFFER: tuple[str, ...] = (
    *("name", "description", "model.moe.", "model.aux_routers", "optim.", "run.", "mesh."),
    *COMPILE_KEYS,
)
# An aux-router stage keeps the model exactly (its routers included).
_MAY_DIFFER_AUX: tuple[str, ...] = (
    *("name", "description", "model.aux_routers", "optim.", "run.", "mesh."),
    *COMPILE_KEYS,
)


# A dense FFN's weights and the expert stacks they seed (the expert axis after the layers').
_DENSE_FFN = {"w_gate_ExDxF": "w_gate_DxF", "w_up_ExDxF": "w_up_DxF", "w_down_ExFxD": "w_down_FxD"}


def dense_to_sparse(source: tuple[str, ...], target: tuple[str, ...]) -> bool:
    """Whether layer pattern `target` is `source` with dense layers made sparse (`moe`), the
    rest unchanged; the same length, so that every block holds the same layers."""
    return len(source) == len(target) and all(
        s == t or (s, t) == ("dense", "moe") for s, t in zip(source, target, strict=True)
    )


def load_source(source: Workdir, cfg: ExperimentConfig) -> ExperimentConfig:
    """The source run's config, checked against the target's (keys outside `_MAY_DIFFER`; the
    layer pattern may turn dense layers into `moe` ones)."""
    saved = source.read_config()
    if saved is None:
        raise ConfigError(
            f"--init-from {source}: no run there (no {source.config_file.name}); train it first"
        )
    aux_stage = cfg.model.aux_routers == "posthoc"
    may_differ: tuple[str, ...] = _MAY_DIFFER_AUX if aux_stage else _MAY_DIFFER
    if not aux_stage and dense_to_sparse(saved.model.layer_pattern, cfg.model.layer_pattern):
        may_differ = (*may_differ, "model.layer_pattern")
    differ = config_diff(saved, cfg, lambda key: key.startswith(may_differ))
    if differ:
        hint = (
            "\n(upcycling may turn the source's dense layers into moe layers, pattern position by "
            "position; no other layer kind changes)"
            if any(d.startswith("model.layer_pattern:") for d in differ) and not aux_stage
            else ""
        )
        raise ConfigError(
            f"--init-from {source}: the source run differs in keys that must match:\n  "
            + "\n  ".join(differ)
            + hint
        )
    return saved


def upcycle_params(source: nnx.State, target: nnx.State, exact: bool = False) -> nnx.State:
    """Target parameters filled from the source as described in the module docstring
    (`exact`: an aux-router stage, every parameter outside the aux routers copied unchanged)."""
    src = dict(nnx.to_flat_state(source))
    out = []
    for path, var in nnx.to_flat_state(target):
        name = "/".join(map(str, path))
        dense = _dense_path(path)
        if path not in src and not exact and dense in src:  # a dense FFN seeds each expert
            e = (var.get_metadata().get("out_sharding") or ()).index("expert")
            value = src[dense][...]
            if value.shape != var.shape[:e] + var.shape[e + 1 :]:
                raise ConfigError(
                    f"cannot upcycle {name} from the dense {'/'.join(map(str, dense))}: "
                    f"shapes {value.shape} and {var.shape}"
                )
            value = jnp.broadcast_to(jnp.expand_dims(value, e), var.shape)
            out.append((path, var.replace(value.astype(var.dtype))))
            continue
        if path not in src and not exact and "shared" in path:
            raise ConfigError(
                f"cannot upcycle {name}: the source has no shared experts "
                "(model.moe.shared_experts) to copy, and a fresh one would change what the "
                "upcycled model computes; upcycle from a run with the same expert layout"
            )
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
            same_expert = e is not None and value.shape[:e] + value.shape[e + 1 :] == (
                var.shape[:e] + var.shape[e + 1 :]
            )
            if e is None or value.shape[e] != 1 or not same_expert:
                raise ConfigError(
                    f"cannot upcycle {name}: source shape {value.shape}, target {var.shape} "
                    "(an expert is copied whole: model.moe.granularity must match)"
                )
            value = jnp.broadcast_to(value, var.shape)
        out.append((path, var.replace(value.astype(var.dtype))))
    return nnx.from_flat_state(out)


def _dense_path(path: tuple) -> tuple | None:
    """The dense FFN weight that seeds an expert stack at `path` (.../ffn/group_g/w_*), or
    None."""
    if len(path) >= 2 and str(path[-2]).startswith("group_") and path[-1] in _DENSE_FFN:
        return (*path[:-2], _DENSE_FFN[path[-1]])
    return None


def upcycled_state(
    target_params: nnx.State, source_params: nnx.State, shardings, exact: bool = False
) -> nnx.State:
    """Upcycled (or, `exact`, loaded) parameters placed in the target's shardings."""
    return jax.device_put(upcycle_params(source_params, target_params, exact), shardings)
