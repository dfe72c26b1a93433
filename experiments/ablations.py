"""Ablations of the tiny comparison (docs/reproduction.md, "Why dense wins at the tiny size"):
one change each to dense_tiny, moma_4t4i_tiny or moe_8x_tiny, run as suites by
`scripts/compare.py` (experiments/suites.py, `ablation_*`). Each shows, with its partner in the
suite, whether the change lets the sparse model beat dense at the tiny size.
"""

import dataclasses
from typing import Any

from experiments.dense import dense
from experiments.moma import moma_4t4i
from experiments.sparse import moe_8x
from moma_jax.config import ExperimentConfig
from moma_jax.registry import register


def _model(cfg: ExperimentConfig, **keys: Any) -> ExperimentConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **keys))


def _capacity_2(cfg: ExperimentConfig) -> ExperimentConfig:
    return _model(cfg, moe=dataclasses.replace(cfg.model.moe, capacity=2.0))


def _peak_lr(cfg: ExperimentConfig, peak: float) -> ExperimentConfig:
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, peak_lr=peak))


@register("moma_4t4i_c2_tiny")
def moma_4t4i_c2_tiny() -> ExperimentConfig:
    """moma_4t4i_tiny with expert-choice capacity 2 (the EC paper's default).

    ~2 experts per token, so ~2x the FFN FLOPs (eta puts it on the FLOPs axis); fewer tokens
    that no expert takes.
    Run: python scripts/compare.py --suite ablation_tiny
    """
    return _capacity_2(moma_4t4i("tiny"))


@register("moe_8x_c2_tiny")
def moe_8x_c2_tiny() -> ExperimentConfig:
    """moe_8x_tiny with expert-choice capacity 2 (the EC paper's default).

    Run: python scripts/compare.py --suite ablation_tiny
    """
    return _capacity_2(moe_8x("tiny"))


@register("moma_4t4i_lrhalf_tiny")
def moma_4t4i_lrhalf_tiny() -> ExperimentConfig:
    """moma_4t4i_tiny with peak LR 1.5e-3 instead of 3e-3.

    Run: python scripts/compare.py --suite ablation_tiny
    """
    return _peak_lr(moma_4t4i("tiny"), 1.5e-3)


@register("moma_4t4i_lrdouble_tiny")
def moma_4t4i_lrdouble_tiny() -> ExperimentConfig:
    """moma_4t4i_tiny with peak LR 6e-3 instead of 3e-3.

    Run: python scripts/compare.py --suite ablation_tiny
    """
    return _peak_lr(moma_4t4i("tiny"), 6e-3)


@register("dense_prenorm_tiny")
def dense_prenorm_tiny() -> ExperimentConfig:
    """dense_tiny with pre-norm (Llama) instead of Swin post-norm.

    Run: python scripts/compare.py --suite ablation_prenorm_tiny
    """
    return _model(dense("tiny"), norm_order="pre")


@register("moma_4t4i_prenorm_tiny")
def moma_4t4i_prenorm_tiny() -> ExperimentConfig:
    """moma_4t4i_tiny with pre-norm (Llama) instead of Swin post-norm.

    Run: python scripts/compare.py --suite ablation_prenorm_tiny
    """
    return _model(moma_4t4i("tiny"), norm_order="pre")


@register("dense_wide_tiny")
def dense_wide_tiny() -> ExperimentConfig:
    """dense_tiny at 2 layers x d=192 (6 heads of 32) instead of 4 x 128: wider, same FLOPs.

    Run: python scripts/compare.py --suite ablation_wide_tiny
    """
    return _model(dense("tiny"), n_layers=2, d_model=192, n_heads=6)


@register("moma_4t4i_wide_tiny")
def moma_4t4i_wide_tiny() -> ExperimentConfig:
    """moma_4t4i_tiny at 2 layers x d=192 (6 heads of 32) instead of 4 x 128.

    Run: python scripts/compare.py --suite ablation_wide_tiny
    """
    return _model(moma_4t4i("tiny"), n_layers=2, d_model=192, n_heads=6)
