"""Loss weights that are training state: a routing row may declare that one of its losses
enters the objective times a coefficient adapted after every step (`routers.Control`; ReMoE's
L1 coefficient, `routers_relu.py`). The coefficients live in `TrainState.controls`, keyed by
the loss's full name ("moe/text/l1_reg"), so Orbax checkpoints them, the checkpoint
fingerprint covers them and a resumed run continues with the exact values. A model with no
such row has none (an empty dict: no leaf, the state's layout unchanged).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.routers import Control


def specs(cfg: ExperimentConfig) -> dict[str, Control]:
    """Each adapted loss of the model, by its full loss name, with metric names made full."""
    if not cfg.model.has_experts:  # no sparse feed-forward in the layer pattern
        return {}
    moe = cfg.model.moe
    out = {}
    for g in range(moe.n_groups):
        control = moe.router(g).control(moe, g)
        if control is not None:
            prefix = f"moe/{moe.group_name(g)}/"
            out[prefix + control.loss] = control._replace(metric=prefix + control.metric)
    return out


def initial(cfg: ExperimentConfig) -> dict[str, jax.Array]:
    """The coefficients at step 0 (float32 scalars)."""
    return {k: jnp.asarray(c.init, jnp.float32) for k, c in specs(cfg).items()}


def weighted(losses: dict[str, jax.Array], controls: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The losses as the objective adds them: an adapted one times its coefficient (a constant
    to the gradient)."""
    missing = sorted(set(controls) - set(losses))
    if missing:
        raise ConfigError(
            f"the model produces no loss {', '.join(missing)} although its routing adapts a "
            "coefficient for it: a routing row's `control` names a loss its route does not return"
        )
    return {
        k: v * jax.lax.stop_gradient(controls[k]) if k in controls else v for k, v in losses.items()
    }


def update(
    cfg: ExperimentConfig, controls: dict[str, jax.Array], micro_metrics: dict[str, jax.Array]
) -> dict[str, jax.Array]:
    """After a step: a coefficient grows by its multiplier while its metric is above target, and
    shrinks by it otherwise (ReMoE: sparsity below target <=> experts per token above it).

    `micro_metrics` are the step's metrics per micro-batch ([n_micro], each a mean over
    layers); the metric is their mean weighted by the group's token share, so a micro-batch
    without the group's tokens (its metric reads 0) does not count, and a step without any
    leaves the coefficient as it is. The coefficient stays within float32's normal range: the
    reference's float32 value can underflow to 0, from where no step would raise it again."""
    tiny, huge = float(jnp.finfo(jnp.float32).tiny), 1e30
    out = {}
    for key, c in specs(cfg).items():
        group = c.metric.rpartition("/")[0]
        share_M = micro_metrics[f"{group}/tokens_share"]
        present = jnp.sum(share_M)
        value = jnp.sum(micro_metrics[c.metric] * share_M) / jnp.maximum(present, tiny)
        grown = jnp.where(
            value > c.target, controls[key] * c.multiplier, controls[key] / c.multiplier
        )
        out[key] = jnp.where(present > 0, jnp.clip(grown, tiny, huge), controls[key])
    return out
