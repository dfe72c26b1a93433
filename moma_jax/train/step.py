"""The pure train step and the evaluation step. No I/O, no branches on model family."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moma_jax.config import ExperimentConfig
from moma_jax.losses import loss_sums, means_from_sums, target_mask
from moma_jax.model import aux_router
from moma_jax.train import controls as controls_lib
from moma_jax.train.state import TrainState, lr_schedule, param_labels

Batch = dict[str, jax.Array]


def _forward(
    graphdef: nnx.GraphDef,
    cfg: ExperimentConfig,
    params: nnx.State,
    batch: Batch,
    key: jax.Array | None,
    routing: str = "teacher_forced",
) -> tuple[dict, dict]:
    model = nnx.merge(graphdef, params)
    logits, aux = model(
        batch["tokens"], batch["segment_ids"], batch["positions"], batch["modality"], key,
        routing=routing,
    )  # fmt: skip
    return loss_sums(logits, batch, cfg.model.z_loss_weight), aux


def _objective_losses(cfg: ExperimentConfig, losses: dict) -> dict:
    """The auxiliary losses the objective adds: all of them, or, in a post-hoc aux-router stage
    (main model frozen), only the aux routers' cross-entropies."""
    if cfg.model.aux_routers == "posthoc":
        return {k: v for k, v in losses.items() if k.endswith("aux_bce")}
    return losses


def _split_micro(batch: Batch, n: int) -> Batch:
    """[B, L] -> [n, B/n, L], micro-batch i taking rows i, i+n, ... so each spans every shard."""
    return {
        k: jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1) for k, v in batch.items()
    }


def make_train_step(
    graphdef: nnx.GraphDef, cfg: ExperimentConfig, tx: optax.GradientTransformation
) -> Callable:
    """Builds `train_step(state, batch) -> (state, metrics)`.

    Gradient accumulation: each micro-batch's cross-entropy and z-loss sums are divided by the
    target count of the whole batch, so the summed gradient equals the full-batch gradient;
    auxiliary losses (means per micro-batch) are averaged over micro-batches.
    """
    n_micro = cfg.data.micro_batches
    schedule = lr_schedule(cfg.optim)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(cfg.run.routing_seed), state.step)
        total = jnp.maximum(jnp.sum(target_mask(batch["segment_ids"])), 1).astype(jnp.float32)

        def objective(params, micro, micro_key):
            sums, aux = _forward(graphdef, cfg, params, micro, micro_key)
            losses = _objective_losses(cfg, controls_lib.weighted(aux["losses"], state.controls))
            aux_loss = sum(losses.values(), jnp.zeros((), jnp.float32))
            if cfg.model.aux_routers == "posthoc":  # the frozen model's loss is only reported
                return aux_loss / n_micro, (sums, aux)
            return (sums["ce"] + sums["z"]) / total + aux_loss / n_micro, (sums, aux)

        grad_fn = jax.grad(objective, has_aux=True)

        def accumulate(carry, xs):
            grads, index = carry
            micro = xs
            g, (sums, aux) = grad_fn(state.params, micro, jax.random.fold_in(key, index))
            return (jax.tree.map(jnp.add, grads, g), index + 1), (sums, aux)

        if n_micro == 1:  # no loop (nor zeros to add to): the same gradient, one less while
            grads, out = grad_fn(state.params, batch, jax.random.fold_in(key, 0))
            sums_A, aux_A = jax.tree.map(lambda x: x[None], out)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, _), (sums_A, aux_A) = jax.lax.scan(
                accumulate, (zeros, 0), _split_micro(batch, n_micro)
            )
        sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums_A)
        aux_losses = controls_lib.weighted(
            {k: jnp.mean(v) for k, v in aux_A["losses"].items()}, state.controls
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = means_from_sums(sums)
        metrics["loss_total"] = (
            metrics["loss"] + metrics["z_loss"] + sum(aux_losses.values(), jnp.zeros(()))
        )
        metrics.update(aux_losses)
        metrics.update({k: jnp.mean(v, axis=0) for k, v in aux_A["metrics"].items()})
        for k in state.controls:  # the unweighted loss and the coefficient it was weighted by
            metrics[f"{k}_raw"] = jnp.mean(aux_A["losses"][k])
            metrics[f"{k}_coeff"] = state.controls[k]
        metrics = aux_router.with_rates(metrics)
        if cfg.model.aux_routers == "none":
            metrics["grad_norm"] = optax.tree.norm(grads)
        else:  # the main model's gradient (what its clipping sees), the aux routers' beside it
            is_aux = jax.tree.leaves(param_labels(state.params))
            norms = [jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)]
            main = [n for n, label in zip(norms, is_aux, strict=True) if label == "main"]
            aux_n = [n for n, label in zip(norms, is_aux, strict=True) if label == "aux"]
            metrics["grad_norm"] = jnp.sqrt(sum(main, jnp.zeros(())))
            metrics["aux_grad_norm"] = jnp.sqrt(sum(aux_n, jnp.zeros(())))
        metrics["lr"] = schedule(state.step)
        metrics["target_tokens"] = sums["count"]
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            # A post-hoc aux-router stage trains no main parameter: its coefficients stay.
            controls=state.controls
            if cfg.model.aux_routers == "posthoc"
            else controls_lib.update(cfg, state.controls, aux_A["metrics"]),
        )
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, cfg: ExperimentConfig, routing: str = "teacher_forced"
) -> Callable:
    """Builds `eval_step(params, batch) -> sums`: the loss sums (combine batches, then
    `means_from_sums`) and, under "aux", the aux routers' agreement counts with the training
    routers (per layer and averaged over layers; sum batches, then `aux_router.with_rates`)."""

    def eval_step(params: nnx.State, batch: Batch) -> dict:
        sums, aux = _forward(graphdef, cfg, params, batch, None, routing)
        counts = {k: v for k, v in aux["metrics"].items() if aux_router.is_count(k)}
        return {**sums, "aux": counts}

    return eval_step


def with_mesh(fn: Callable, mesh) -> Callable:
    """`fn` traced with `mesh` as the abstract mesh (`sharding.constrain`, `model/exchange.py`)."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def jit_train_step(
    graphdef: nnx.GraphDef,
    cfg: ExperimentConfig,
    tx: optax.GradientTransformation,
    shardings,
    batch_sharding,
    mesh,
) -> Callable:
    """The train step jitted with explicit in/out shardings, donating the old state; traced
    under the mesh, so model code can constrain and exchange by logical axis names."""
    return jax.jit(
        with_mesh(make_train_step(graphdef, cfg, tx), mesh),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
