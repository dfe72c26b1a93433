"""Mixture-of-Depths (MoMa 2.1) in alternating layers from layer 0: `mod_{base}` wraps the base
architecture's layer kind, capacity 0.25 (model.mod.capacity).

At the paper sizes the MoD models are deeper/wider to match the dense model's FLOPs (DESIGN.md
2.1, Table 1): 90m 14 x 512, 435m 40 x 1024, 1.4b 32 x 2304 with 18 heads (head_dim 128).
"""

import dataclasses

from experiments.aux import AUX_STAGES
from experiments.dense import SIZES, dense
from experiments.sparse import sparse_variant
from moma_jax.config import ExperimentConfig, SparseConfig
from moma_jax.registry import register_sizes

# size -> (layers, d_model, heads) of the FLOP-matched MoD model.
MOD_SHAPES = {"90m": (14, 512, 8), "435m": (40, 1024, 16), "1.4b": (32, 2304, 18)}


def with_mod(size: str, kind: str, moe: SparseConfig) -> ExperimentConfig:
    """The dense base at `size` with layers alternating `mod_{kind}` and `kind`."""
    cfg = sparse_variant(dense(size), kind, moe)
    model = dataclasses.replace(cfg.model, layer_pattern=(f"mod_{kind}", kind))
    if size in MOD_SHAPES:
        layers, d, heads = MOD_SHAPES[size]
        model = dataclasses.replace(model, n_layers=layers, d_model=d, n_heads=heads)
    return dataclasses.replace(cfg, model=model)


@register_sizes("mod_moma_4t4i", SIZES, stages=AUX_STAGES)
def mod_moma_4t4i(size: str) -> ExperimentConfig:
    """moma_4t4i with Mixture-of-Depths in every other layer, capacity 0.25 (MoMa's best).

    Run: python scripts/train.py --exp mod_moma_4t4i_tiny
    Describe: python scripts/describe.py --exp mod_moma_4t4i_tiny
    Shows: the MoD layers' executed FLOPs at about a quarter of their dense counterparts
    (describe), mod/keep_frac and mod/weight_mean in metrics.jsonl, and the losses against
    moma_4t4i_tiny per FLOP.
    """
    return with_mod(size, "moe", SparseConfig(group_experts=(4, 4)))


@register_sizes("mod_moma_1t1i", SIZES, stages=AUX_STAGES)
def mod_moma_1t1i(size: str) -> ExperimentConfig:
    """moma_1t1i with Mixture-of-Depths in every other layer, capacity 0.25.

    Run: python scripts/train.py --exp mod_moma_1t1i_tiny
    Shows: as mod_moma_4t4i, against moma_1t1i_tiny.
    """
    return with_mod(size, "moe", SparseConfig(group_experts=(1, 1)))


@register_sizes("mod_dense", SIZES, stages=AUX_STAGES)
def mod_dense(size: str) -> ExperimentConfig:
    """dense with Mixture-of-Depths in every other layer, capacity 0.25.

    Run: python scripts/train.py --exp mod_dense_tiny
    Shows: as mod_moma_4t4i, against dense_tiny.
    """
    return with_mod(size, "dense", SparseConfig())
