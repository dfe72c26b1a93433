"""Attention experts per modality: Mixture-of-Head attention (MoH) and SwitchHead, each with its
router inside the modality group (a text token is routed among text heads or experts, an image
token among image ones), beside MoMa's modality-aware FFN experts and MoT's untied attention.

Each is its dense base (dense.py: layers, width, SwiGLU, data and schedule) with every layer of
the new kind; the head counts are chosen so the ideal FLOPs per token stay within 5% of the
dense base's at the tiny size (`python scripts/describe.py --exp moh_tiny`).
"""

import dataclasses

from experiments.dense import SIZES, dense
from moma_jax.config import ExperimentConfig, MoHConfig, SwitchHeadConfig
from moma_jax.registry import register_sizes


@register_sizes("moh", SIZES)
def moh(size: str) -> ExperimentConfig:
    """MoH (Jin et al. 2024, arXiv 2410.11842): a dense base of n heads of width d/n becomes
    3n/2 heads of the same width: n/2 shared, n/2 routed per modality, each token taking the
    top n/4 of its modality's (tiny: 6 heads, 2 shared + 2 text + 2 image, top-1: 3 of the 4
    heads a token can use, the paper's 75%); the paper's gates and balance loss (beta 0.01).

    Run: python scripts/train.py --exp moh_tiny
    Describe: python scripts/describe.py --exp moh_tiny
    Shows: per-modality losses against dense_tiny at equal ideal FLOPs per token (ratio 1.003
    at tiny; 0.96-1.00 at the paper sizes), the balance term per modality
    (moh/{text,image}/balance in metrics.jsonl); causal by construction (per-token routing),
    decoded with the ordinary KV cache.
    """
    base = dense(size)
    n, d = base.model.n_heads, base.model.d_model
    model = dataclasses.replace(
        base.model,
        layer_pattern=("moh",),
        n_heads=3 * n // 2,
        head_dim=d // n,
        moh=MoHConfig(shared_heads=n // 2, top_k=n // 4),
    )
    return dataclasses.replace(base, model=model)


@register_sizes("switchhead", SIZES)
def switchhead(size: str) -> ExperimentConfig:
    """SwitchHead (Csordas et al. 2023, arXiv 2312.07987): a dense base of n heads of width d/n
    becomes n/2 heads of width 3d/(2n) whose value and output projections are 4 experts per
    modality, top-2 by sigmoid score; queries and keys shared (tiny: 2 heads of 48).

    Run: python scripts/train.py --exp switchhead_tiny
    Describe: python scripts/describe.py --exp switchhead_tiny
    Shows: per-modality losses against dense_tiny at equal ideal FLOPs per token (ratio 1.008
    at tiny; 0.96-1.00 at the paper sizes), the mean chosen gate per modality
    (switchhead/{text,image}/mean_gate); causal by construction, decoded with the ordinary KV
    cache (the mixed values are cached).
    """
    base = dense(size)
    n, d = base.model.n_heads, base.model.d_model
    model = dataclasses.replace(
        base.model,
        layer_pattern=("switchhead",),
        n_heads=n // 2,
        head_dim=3 * d // (2 * n),
        switchhead=SwitchHeadConfig(experts=4, top_k=2),
    )
    return dataclasses.replace(base, model=model)
