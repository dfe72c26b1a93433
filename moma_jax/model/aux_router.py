"""Auxiliary routers (MoMa 2.1): a small causal predictor of each batch-level routing decision.

Expert choice and Mixture-of-Depths pick tokens by ranking a whole routing group, future
tokens included, so they cannot decide one token at a time. An auxiliary router predicts, from
the token alone, whether the training router takes it:

    score = sigmoid(SiLU(x W1) W2),  W1: D x D/2,  W2: D/2 x out

one per sparse layer per expert group of more than one expert (out = E_M) and one per MoD layer
(out = 1). Its input is under stop-gradient, so its binary cross-entropy against the training
router's decisions never changes the main model's gradients. With `routing="causal"` the layers
route by `score > 0.5` (logit > 0) and the main router still supplies the weight.

`model.aux_routers`: "none" (no aux routers), "joint" (trained with the main model, in their own
optimizer branch) or "posthoc" (the paper's stage: main model loaded from a finished run and
frozen, only the aux routers train).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moma_jax.config import ConfigError, ExperimentConfig, ModelConfig
from moma_jax.model.layers import param

PATH_NAME = "aux_router"  # the attribute every aux router lives under (optimizer labels use it)


class AuxRouter(nnx.Module):
    """sigmoid(SiLU(x W1) W2) as logits (float32); the input is stop-gradient'd."""

    def __init__(self, cfg: ModelConfig, out: int, *, rngs: nnx.Rngs):
        d, std, dt = cfg.d_model, cfg.init_std, cfg.param_dtype
        self.w1_DxF = param(rngs, (d, d // 2), ("embed", None), std, dt)
        self.w2_FxO = param(rngs, (d // 2, out), (None, None), std, dt)

    def __call__(self, x_XxD: jax.Array) -> jax.Array:
        x = jax.lax.stop_gradient(x_XxD).astype(jnp.float32)
        h = jax.nn.silu(x @ self.w1_DxF[...].astype(jnp.float32))
        return h @ self.w2_FxO[...].astype(jnp.float32)


def maybe_aux_router(cfg: ModelConfig, out: int, rngs: nnx.Rngs) -> AuxRouter | None:
    return AuxRouter(cfg, out, rngs=rngs) if cfg.aux_routers != "none" else None


def require(router: AuxRouter | None, what: str) -> AuxRouter:
    """The aux router a causal layer needs; a clear error where the run has none."""
    if router is None:
        raise ConfigError(
            f"causal routing needs auxiliary routers, and this model's {what} has none: "
            "train them with the run's ARCH_aux_SIZE experiment, initialised from the run (or "
            "ARCH_joint_aux_SIZE from scratch)"
        )
    return router


class NoAuxRoutersError(ConfigError):
    """A run that cannot route causally for want of aux routers. It names the experiments that
    train them, `posthoc` (initialised from this run) and `joint` (from scratch); a command turns
    them into a command line."""

    def __init__(self, cfg: ExperimentConfig, workdir: object):
        arch, _, size = cfg.name.rpartition("_")
        arch = arch or cfg.name
        self.workdir = workdir
        self.posthoc, self.joint = f"{arch}_aux_{size}", f"{arch}_joint_aux_{size}"
        super().__init__(
            f"{workdir} ({cfg.name}) routes by ranking whole routing groups (expert choice or "
            "Mixture-of-Depths) and has no auxiliary routers, so it cannot run causally; the "
            f"`{self.posthoc}` experiment trains them, initialised from this run (or "
            f"`{self.joint}` from scratch)"
        )


def bce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean binary cross-entropy over the masked entries (mask broadcasts against logits)."""
    t = targets.astype(jnp.float32)
    per = jnp.maximum(logits, 0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    m = jnp.broadcast_to(mask, logits.shape).astype(jnp.float32)
    return jnp.sum(per * m) / jnp.maximum(jnp.sum(m), 1.0)


def agreement(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Counts of the aux decision (logit > 0) against the training router's, over the masked
    entries: tp, fp, fn, tn (sums, so batches and layers combine exactly)."""
    pred, t = logits > 0, targets.astype(bool)
    m = jnp.broadcast_to(mask, logits.shape).astype(bool)
    count = lambda a: jnp.sum(a & m).astype(jnp.float32)  # noqa: E731
    return {"tp": count(pred & t), "fp": count(pred & ~t), "fn": count(~pred & t),
            "tn": count(~pred & ~t)}  # fmt: skip


def aux_terms(
    router: AuxRouter, x_XxD: jax.Array, taken_XxO: jax.Array, mask_Xx1: jax.Array
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(losses, metrics) of one aux router against the training router's decisions."""
    logits = router(x_XxD)
    taken = jax.lax.stop_gradient(taken_XxO)
    counts = agreement(logits, taken, mask_Xx1)
    return {"aux_bce": bce(logits, taken, mask_Xx1)}, {f"aux_{k}": v for k, v in counts.items()}


def rates(tp, fp, fn, tn) -> dict:
    """Balanced accuracy, precision and recall from counts (floats or arrays). Plain accuracy
    misleads: answering "not taken" everywhere scores 87.5% with 8 experts at capacity 1."""
    tpr = tp / jnp.maximum(tp + fn, 1.0)
    tnr = tn / jnp.maximum(tn + fp, 1.0)
    return {
        "balanced_accuracy": 0.5 * (tpr + tnr),
        "precision": tp / jnp.maximum(tp + fp, 1.0),
        "recall": tpr,
    }


COUNTS = ("tp", "fp", "fn", "tn")


def is_count(key: str) -> bool:
    return any(key.endswith(f"aux_{c}") for c in COUNTS)


def with_rates(metrics: dict) -> dict:
    """`metrics` with each aux router's counts ("P/aux_tp", ...) replaced by its rates
    ("P/aux_balanced_accuracy", "P/aux_precision", "P/aux_recall")."""
    out = {k: v for k, v in metrics.items() if not is_count(k)}
    for key in metrics:
        if key.endswith("aux_tp"):
            prefix = key[: -len("tp")]
            counts = [metrics[prefix + c] for c in COUNTS]
            out.update({prefix + name: v for name, v in rates(*counts).items()})
    return out
