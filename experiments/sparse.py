"""Mixed-modal sparse baselines: MoE with expert choice or token choice, and Mixture-of-
Transformers. Each is its dense base (dense.py: same layers, width, data and schedule, so the
same ideal FLOPs per token) with a different layer kind or routing.
"""

import dataclasses

from experiments.aux import AUX_STAGES
from experiments.dense import SIZES, dense
from moma_jax.config import ExperimentConfig, SparseConfig, TokenMixConfig
from moma_jax.registry import register_sizes

MIXED = SparseConfig(group_experts=(8,), modality_group=(0, 0))
TOKEN_CHOICE = dataclasses.replace(
    MIXED, routing="token_choice", router_score="softmax", capacity=1.25
)


def sparse_variant(base: ExperimentConfig, kind: str, moe: SparseConfig | None) -> ExperimentConfig:
    """The dense base with every layer of `kind`. Routing groups hold max(seq_len, 4096)
    tokens: one packed row at the paper's sizes (seq_len 4096), and 16 rows of 256 at the tiny
    size, which is its whole batch (the paper's "batch on one GPU")."""
    model = dataclasses.replace(base.model, layer_pattern=(kind,))
    if moe is not None:
        group_tokens = max(base.data.seq_len, 4096)
        moe = dataclasses.replace(moe, routing_group_tokens=group_tokens)
        model = dataclasses.replace(model, moe=moe)
    return dataclasses.replace(base, model=model)


@register_sizes("moe_8x", SIZES, stages=AUX_STAGES)
def moe_8x(size: str) -> ExperimentConfig:
    """8 mixed-modal expert-choice experts, sigmoid router, capacity 1 (k = N/8 per expert).

    Run: python scripts/train.py --exp moe_8x_tiny    (paper sizes: --set data.path=DIR)
    Describe: python scripts/describe.py --exp moe_8x_tiny
    Shows: per-modality losses against dense_tiny at equal ideal FLOPs per token, with expert
    loads, router scores and wasted slots in metrics.jsonl.
    """
    return sparse_variant(dense(size), "moe", MIXED)


@register_sizes("moe_8x_limoe", SIZES, stages=AUX_STAGES)
def moe_8x_limoe(size: str) -> ExperimentConfig:
    """moe_8x with LIMoE's per-modality entropy losses on its mixed-modal router (Mustafa et
    al. 2022, arXiv 2206.02770): local (each token's routing entropy, per modality) 0.01 and
    global (each modality's marginal routing entropy kept above ln 4 nats) 0.01. The weights
    and threshold are our choice for 8 experts, not the paper's tuned values.

    Run: python scripts/train.py --exp moe_8x_limoe_tiny
    Shows: against moe_8x_tiny, whether the losses keep image tokens (23% of the mix) from
    crowding onto few experts (moe/text+image/load_*, the limoe_* losses in metrics.jsonl).
    """
    moe = dataclasses.replace(
        MIXED, limoe_local_weight=0.01, limoe_global_weight=0.01, limoe_global_threshold=1.386
    )
    return sparse_variant(dense(size), "moe", moe)


@register_sizes("deepseek_8x", SIZES)
def deepseek_8x(size: str) -> ExperimentConfig:
    """DeepSeekMoE's token-choice form, mixed-modal as in the paper (arXiv 2401.06066): moe_8x's
    8 experts at granularity 4 = 32 quarter-experts, 1 shared, 31 routed, each token its top 3
    routed (4 x 1 - 1), softmax gates not renormalised, capacity factor 1.25 (drops counted),
    DeepSeekMoE's expert-level balance loss (0.01 x sum_i f_i P_i over all top-3 choices) and
    z-loss; its device-level loss applies where experts are sharded: add
    `--set model.moe.balance_devices=D --set model.moe.device_lb_loss_weight=W` (D: the expert
    mesh axis's size).

    Run: python scripts/train.py --exp deepseek_8x_tiny
    Shows: against switch_8x_tiny and moe_8x_tiny at equal ideal FLOPs, fine-grained experts
    with a shared one under token choice; dropped_frac in metrics.jsonl.
    """
    moe = dataclasses.replace(
        TOKEN_CHOICE,
        group_experts=(31,),
        granularity=4,
        shared_experts=1,
        top_k=3,
        top_k_renormalize=False,
        balance_loss="deepseek",
    )
    return sparse_variant(dense(size), "moe", moe)


@register_sizes("switch_8x", SIZES)
def switch_8x(size: str) -> ExperimentConfig:
    """8 mixed experts, token-choice top-1 (Switch), capacity factor 1.25.

    With the Switch load-balancing loss (0.01) and the ST-MoE router z-loss (0.001).
    Run: python scripts/train.py --exp switch_8x_tiny
    Shows: dropped tokens and the balance loss in metrics.jsonl, and the losses against moe_8x
    (expert choice drops no tokens by construction).
    """
    return sparse_variant(dense(size), "moe", TOKEN_CHOICE)


@register_sizes("switch_8x_bpr", SIZES, stages=AUX_STAGES)
def switch_8x_bpr(size: str) -> ExperimentConfig:
    """switch_8x with V-MoE's Batch Prioritized Routing: capacity filled by descending top
    routing weight, not by position, so overflow drops the tokens the router is least sure of.

    The order depends on future tokens, so causal evaluation and generation need aux routers
    (switch_8x_bpr_aux_tiny after this run, or switch_8x_bpr_joint_aux_tiny).
    Run: python scripts/train.py --exp switch_8x_bpr_tiny
    Shows: against switch_8x_tiny (same capacity; at one router state both drop as many
    assignments, BPR chooses which), the held-out loss of dropping the least confident tokens.
    """
    bpr = dataclasses.replace(TOKEN_CHOICE, routing="token_choice_bpr")
    return sparse_variant(dense(size), "moe", bpr)


@register_sizes("gshard_8x", SIZES)
def gshard_8x(size: str) -> ExperimentConfig:
    """8 mixed experts, token-choice top-2 (GShard), capacity factor 1.25.

    Run: python scripts/train.py --exp gshard_8x_tiny
    Shows: as switch_8x, with two experts per token (about twice the FFN FLOPs).
    """
    return sparse_variant(dense(size), "moe", dataclasses.replace(TOKEN_CHOICE, top_k=2))


@register_sizes("mot", SIZES)
def mot(size: str) -> ExperimentConfig:
    """Mixture-of-Transformers (Liang et al. 2024): all non-embedding weights per modality.

    Run: python scripts/train.py --exp mot_tiny
    Describe: python scripts/describe.py --exp mot_tiny
    Shows: per-modality losses against dense_tiny and moma_1t1i_tiny (which unties only the FFN)
    at equal ideal FLOPs per token.
    """
    return sparse_variant(dense(size), "mot", None)


@register_sizes("mixture_of_tokens", SIZES)
def mixture_of_tokens(size: str) -> ExperimentConfig:
    """Mixture of Tokens (Antoniak et al. 2023, arXiv 2310.15961): in every layer, 8 SwiGLU
    experts of the dense hidden x 8 / 8 each (so the ideal FLOPs per token match dense), each
    taking one softmax mixture (temperature 1) of the 8 tokens at the same position of a fixed
    group of 8 consecutive rows; causal along the sequence, no aux router.

    Run: python scripts/train.py --exp mixture_of_tokens_tiny
         python scripts/evaluate.py --workdir runs/mixture_of_tokens_tiny --routing causal
    Describe: python scripts/describe.py --exp mixture_of_tokens_tiny
    Shows: per-modality losses against dense_tiny and moe_8x_tiny at equal ideal FLOPs per token
    (describe), the mixing weights' entropy (motok/weight_entropy in metrics.jsonl), and the
    causal evaluation (mixing off: each token alone through all 8 experts, output / 8) against
    the teacher-forced one: the paper's switch to unbatched inference without transition tuning.
    """
    cfg = sparse_variant(dense(size), "motok", None)
    motok = TokenMixConfig(experts=8, group_rows=8, temperature=1.0)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, motok=motok))
