"""Next-token losses over packed rows, split by the modality of the target token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moma_jax.modality import MODALITY_NAMES


def target_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """[B, L-1] bool: position t predicts t+1 iff both lie in the same real (non-pad) document."""
    seg = segment_ids_BxL
    return (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)


def target_mask_np(segment_ids_BxL) -> np.ndarray:
    """`target_mask` on the host (NumPy)."""
    seg = np.asarray(segment_ids_BxL)
    return (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)


def loss_sums(logits_BxLxV: jax.Array, batch: dict, z_loss_weight: float) -> dict[str, jax.Array]:
    """Sums (not means) of cross-entropy and z-loss, overall and per target modality, with counts.

    Sums let micro-batches and evaluation batches be combined exactly: divide by the total count.
    """
    logits = logits_BxLxV[:, :-1].astype(jnp.float32)
    targets_BxT = batch["tokens"][:, 1:]
    valid_BxT = target_mask(batch["segment_ids"]).astype(jnp.float32)
    log_z_BxT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    ce_BxT = (log_z_BxT - target_logit_BxT) * valid_BxT
    z_BxT = z_loss_weight * jnp.square(log_z_BxT) * valid_BxT
    out = {"ce": jnp.sum(ce_BxT), "z": jnp.sum(z_BxT), "count": jnp.sum(valid_BxT)}
    modality_BxT = batch["modality"][:, 1:]
    for m, name in enumerate(MODALITY_NAMES):
        is_m = (modality_BxT == m).astype(jnp.float32)
        out[f"ce_{name}"] = jnp.sum(ce_BxT * is_m)
        out[f"count_{name}"] = jnp.sum(valid_BxT * is_m)
    return out


def means_from_sums(sums: dict[str, jax.Array], prefix: str = "") -> dict[str, jax.Array]:
    """loss, loss_text, loss_image, z_loss from summed statistics (0 where a modality is absent)."""
    count = jnp.maximum(sums["count"], 1.0)
    out = {f"{prefix}loss": sums["ce"] / count, f"{prefix}z_loss": sums["z"] / count}
    for name in MODALITY_NAMES:
        out[f"{prefix}loss_{name}"] = sums[f"ce_{name}"] / jnp.maximum(sums[f"count_{name}"], 1.0)
    return out
