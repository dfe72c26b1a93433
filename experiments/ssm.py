"""State-space models (layer kinds in moma_jax/model/ssm_kinds.py): Mamba, Mixture-of-Mamba and
MoE-Mamba with MoMa's modality groups. Each is its dense base (dense.py: same layers, width,
data and schedule) with every layer's attention replaced by a Mamba mixer.

FLOPs: a Mamba mixer costs about 6 expand D^2 per token against attention's 8 D^2 plus its
seq_len term, so the mixer's width sets the match. At the tiny size (D 128, seq 256) expand 1.5
(Di 192, d_state 16) puts the mixer at 190K FLOPs per token against attention's 197K: the whole
model is 0.986x dense_tiny's ideal FLOPs per token (Mamba's expand 2 would be 1.107x). The paper
sizes keep Mamba's defaults (expand 2, d_state 16); at seq 4096 attention's score term makes
them cheaper than their dense base (python scripts/describe.py --exp mamba_1.4b).
"""

import dataclasses

from experiments.aux import AUX_STAGES
from experiments.dense import SIZES, dense
from experiments.sparse import sparse_variant
from moma_jax.config import ExperimentConfig, MambaConfig, SparseConfig
from moma_jax.registry import register_sizes

TINY_MAMBA = MambaConfig(expand=1.5)  # FLOP-matched to dense_tiny (module docstring)


def ssm_variant(size: str, kind: str, moe: SparseConfig | None) -> ExperimentConfig:
    """The dense base at `size` with every layer of the state-space `kind`."""
    cfg = sparse_variant(dense(size), kind, moe)
    mamba = TINY_MAMBA if size == "tiny" else MambaConfig()
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mamba=mamba))


@register_sizes("mamba", SIZES)
def mamba(size: str) -> ExperimentConfig:
    """Mamba (Gu & Dao 2023): every layer a selective state-space mixer and a SwiGLU; no
    attention, no positions but the recurrence (RoPE is unused).

    Run: python scripts/train.py --exp mamba_tiny
    Describe: python scripts/describe.py --exp mamba_tiny
    Shows: per-modality losses against dense_tiny at equal ideal FLOPs per token (0.986x);
    the dense baseline of mom_tiny and moe_mamba_tiny.
    """
    return ssm_variant(size, "mamba", None)


@register_sizes("mom", SIZES)
def mom(size: str) -> ExperimentConfig:
    """Mixture-of-Mamba (Liang et al. 2025, arXiv 2501.16295): mamba with the mixer's in, x,
    dt and out projections untied by modality (conv1d, A and D shared, as the paper).

    Run: python scripts/train.py --exp mom_tiny
    Shows: per-modality losses against mamba_tiny at the same ideal FLOPs per token (the
    paper reports the image loss reached at a fraction of Mamba's FLOPs), and against mot_tiny
    (which unties every weight of an attention layer).
    """
    return ssm_variant(size, "mom", None)


@register_sizes("moe_mamba", SIZES, stages=AUX_STAGES)
def moe_mamba(size: str) -> ExperimentConfig:
    """MoE-Mamba (Pioro et al. 2024, arXiv 2401.04081) with MoMa's experts: every layer a Mamba
    mixer, then moma_4t4i's sparse FFN (4 text + 4 image expert-choice experts). Expert choice
    ranks the routing group, so causal evaluation and generation need aux routers
    (moe_mamba_aux_tiny after this run, or moe_mamba_joint_aux_tiny).

    Run: python scripts/train.py --exp moe_mamba_tiny
    Shows: per-modality losses against mamba_tiny and moma_4t4i_tiny at equal ideal FLOPs per
    token, with expert loads per modality in metrics.jsonl.
    """
    return ssm_variant(size, "mamba_moe", SparseConfig(group_experts=(4, 4)))
