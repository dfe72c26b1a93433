"""Modality-aware experts (MoMa, Lin et al. 2024): a text experts and b image experts; tokens go
to their modality's group, then expert choice inside it. moma_1t1i is pure FFN modality untying.

Each is its dense base (dense.py) with every layer an MoE layer of these groups; the paper's
sizes need `--set data.path=DIR`, the tiny size trains on the bundled data.
"""

import dataclasses
from collections.abc import Callable

from experiments.aux import AUX_STAGES
from experiments.dense import SIZES, dense
from experiments.sparse import sparse_variant
from moma_jax.config import ExperimentConfig, SparseConfig
from moma_jax.registry import register_sizes


def moma(size: str, text_experts: int, image_experts: int) -> ExperimentConfig:
    """The dense base at `size` with text and image expert groups, expert choice in each."""
    return sparse_variant(
        dense(size), "moe", SparseConfig(group_experts=(text_experts, image_experts))
    )


@register_sizes("moma_4t4i", SIZES, stages=AUX_STAGES)
def moma_4t4i(size: str) -> ExperimentConfig:
    """4 text + 4 image expert-choice experts: the paper's headline model.

    Run: python scripts/train.py --exp moma_4t4i_tiny
         python scripts/train.py --exp moma_4t4i_1.4b --set data.path=DIR
    Describe: python scripts/describe.py --exp moma_4t4i_tiny
    Shows: per-modality losses against dense_tiny's at equal ideal FLOPs per token (the paper
    finds them lower: 3.7x FLOPs savings at 1.4b; what our seeds carry at tiny scale is in the
    paper_tiny suite's report), with expert loads and router scores per modality in
    metrics.jsonl.
    """
    return moma(size, 4, 4)


@register_sizes("moma_4t4i_topp", SIZES)
def moma_4t4i_topp(size: str) -> ExperimentConfig:
    """moma_4t4i with top-p (dynamic) routing in each modality group (Huang et al. 2024,
    arXiv 2403.07652) instead of expert choice: a token takes experts in descending softmax
    prob until their mass reaches 0.4, gate P; dynamic (entropy) loss 1e-4, balance loss 1e-2.

    Per-token and dropless: causal evaluation and generation need no aux routers.
    Run: python scripts/train.py --exp moma_4t4i_topp_tiny
    Describe: python scripts/describe.py --exp moma_4t4i_topp_tiny
    Shows: experts per token per modality (moe/{text,image}/experts_per_token; the ideal FLOPs
    assume 1, as dense and moma_4t4i; above 1 the run costs more, flops_executed does not
    count it) and the losses against moma_4t4i_tiny's, teacher-forced and causal alike.
    """
    moe = SparseConfig(group_experts=(4, 4), routing="top_p", router_score="softmax")
    return sparse_variant(dense(size), "moe", moe)


@register_sizes("moma_4t4i_remoe", SIZES)
def moma_4t4i_remoe(size: str) -> ExperimentConfig:
    """moma_4t4i with ReMoE's ReLU routing in each modality group (Wang et al. 2024, arXiv
    2412.14711) instead of expert choice: gates ReLU(x W_r), every expert with a positive gate
    takes the token; an L1 loss whose coefficient (from 1e-8, x or / 1.2 per step) steers the
    measured experts per token of each group to 1 (the paper's sparsity 1 - k/E = 0.75).

    Per-token and dropless: causal evaluation and generation need no aux routers.
    Run: python scripts/train.py --exp moma_4t4i_remoe_tiny
    Shows: moe/{text,image}/experts_per_token falling from ~2 to 1 over the first ~100 steps
    while moe/{text,image}/l1_reg_coeff climbs to where it holds them there (before that the
    run executes more expert FLOPs than the ideal count; flops_executed does not count it),
    and the losses against moma_4t4i_tiny's, teacher-forced and causal alike.
    """
    moe = SparseConfig(group_experts=(4, 4), routing="relu")
    return sparse_variant(dense(size), "moe", moe)


@register_sizes("moma_4t4i_null", SIZES)
def moma_4t4i_null(size: str) -> ExperimentConfig:
    """moma_4t4i with AdaMoE's null experts in each modality group (Zeng et al. 2024, arXiv
    2406.13233) instead of expert choice: token choice top-2 over 4 experts and 4 null experts
    (zero output, no FLOPs), the real experts' gates renormalised, the Switch balance loss
    (0.01) over all 8, so a token uses 0, 1 or 2 experts and 2 x 4 / 8 = 1 on average.

    Per-token and dropless: causal evaluation and generation need no aux routers.
    Run: python scripts/train.py --exp moma_4t4i_null_tiny
    Shows: experts per token per modality (moe/{text,image}/experts_per_token, 1 at balance;
    untaken_frac = tokens that chose only null experts) and the losses against
    moma_4t4i_tiny's and moma_4t4i_topp_tiny's.
    """
    moe = SparseConfig(
        group_experts=(4, 4),
        routing="token_choice_null",
        router_score="softmax",
        top_k=2,
        null_experts=4,
    )
    return sparse_variant(dense(size), "moe", moe)


@register_sizes("moma_4t4i_topany", SIZES)
def moma_4t4i_topany(size: str) -> ExperimentConfig:
    """moma_4t4i with DynMoE's top-any gating in each modality group (Guo et al. 2024, arXiv
    2405.14297) instead of expert choice: a token takes every expert whose score
    sigmoid(cos(x, w_e)) exceeds that expert's learned threshold, gates 1/k over its k experts,
    its top-1 expert when it takes none; DynMoE's diverse-and-simple, balance and efficiency
    losses at 0.01 each.

    Per-token and dropless: causal evaluation and generation need no aux routers.
    Run: python scripts/train.py --exp moma_4t4i_topany_tiny
    Describe: python scripts/describe.py --exp moma_4t4i_topany_tiny
    Shows: experts per token per modality (moe/{text,image}/experts_per_token; the ideal FLOPs
    assume 1, as dense and moma_4t4i; above 1 the run costs more, flops_executed does not
    count it; multi_expert_frac = tokens with 2+) and the losses against moma_4t4i_tiny's and
    moma_4t4i_topp_tiny's, teacher-forced and causal alike.
    """
    moe = SparseConfig(group_experts=(4, 4), routing="top_any")
    return sparse_variant(dense(size), "moe", moe)


@register_sizes("moma_fine4", SIZES, stages=AUX_STAGES)
def moma_fine4(size: str) -> ExperimentConfig:
    """moma_4t4i at granularity 4 (DeepSeekMoE's fine-grained experts, arXiv 2401.06066, inside
    MoMa's modality groups): 16 text + 16 image experts of a quarter of the FFN's hidden size,
    expert choice at capacity 4 (each token gets 4 quarter-experts on average: the dense FFN's
    FLOPs), no shared expert.

    Run: python scripts/train.py --exp moma_fine4_tiny
    Describe: python scripts/describe.py --exp moma_fine4_tiny
    Shows: against moma_4t4i_tiny (granularity 1) at equal ideal FLOPs, what finer experts do
    per modality (the granularity_tiny comparison).
    """
    moe = SparseConfig(group_experts=(16, 16), granularity=4, capacity=4.0)
    return sparse_variant(dense(size), "moe", moe)


@register_sizes("moma_4t4i_shared", SIZES, stages=AUX_STAGES)
def moma_4t4i_shared(size: str) -> ExperimentConfig:
    """DeepSeekMoE inside each modality group (arXiv 2401.06066): granularity 4, one shared
    expert (always on for the group's tokens) and 15 routed fine-grained experts per group by
    expert choice at capacity 3, so a token uses 1 + 3 quarter-experts: the dense FFN's FLOPs.

    Run: python scripts/train.py --exp moma_4t4i_shared_tiny
    Describe: python scripts/describe.py --exp moma_4t4i_shared_tiny
    Shows: against moma_fine4_tiny (no shared expert) and moma_4t4i_tiny, what an always-on
    expert per modality adds at equal ideal FLOPs.
    """
    moe = SparseConfig(group_experts=(15, 15), granularity=4, shared_experts=1, capacity=3.0)
    return sparse_variant(dense(size), "moe", moe)


def fine_grained(granularity: int, shared: bool) -> Callable[[str], ExperimentConfig]:
    """moma_4t4i's groups at `granularity` m (4m experts of hidden F/m per group, expert choice
    at capacity m), or with one shared expert (4m - 1 routed at capacity m - 1): one dense
    FFN's FLOPs per token either way (the granularity_tiny suite)."""
    experts = 4 * granularity - int(shared)

    def build(size: str) -> ExperimentConfig:
        moe = SparseConfig(
            group_experts=(experts, experts),
            granularity=granularity,
            shared_experts=int(shared),
            capacity=float(granularity - int(shared)),
        )
        return sparse_variant(dense(size), "moe", moe)

    name = f"moma_fine{granularity}" + ("_shared" if shared else "")
    build.__doc__ = f"""moma_4t4i at granularity {granularity}: {experts} experts of 1/{granularity}
    of the FFN per group{", plus one shared (always-on) expert" if shared else ""}, expert
    choice at capacity {granularity - int(shared)} (DeepSeekMoE in MoMa's modality groups).

    Run: python scripts/train.py --exp {name}_tiny
    Shows: its per-modality losses against moma_4t4i_tiny and the other granularities at equal
    ideal FLOPs (python scripts/compare.py --suite granularity_tiny).
    """
    return build


register_sizes("moma_fine2", SIZES, stages=AUX_STAGES)(fine_grained(2, shared=False))
register_sizes("moma_fine8", SIZES, stages=AUX_STAGES)(fine_grained(8, shared=False))
register_sizes("moma_fine2_shared", SIZES, stages=AUX_STAGES)(fine_grained(2, shared=True))
register_sizes("moma_fine8_shared", SIZES, stages=AUX_STAGES)(fine_grained(8, shared=True))


@register_sizes("moma_1t1i", SIZES)
def moma_1t1i(size: str) -> ExperimentConfig:
    """one FFN per modality (modality untying), no routing.

    Run: python scripts/train.py --exp moma_1t1i_tiny
    Shows: how much of moma_4t4i's gain comes from untying the modalities alone.
    """
    return moma(size, 1, 1)


@register_sizes("moma_2t2i", SIZES, stages=AUX_STAGES)
def moma_2t2i(size: str) -> ExperimentConfig:
    """2 text + 2 image expert-choice experts.

    Run: python scripts/train.py --exp moma_2t2i_tiny
    Shows: its losses beside moma_1t1i's and moma_4t4i's (the paper: more experts, lower
    loss).
    """
    return moma(size, 2, 2)


@register_sizes("moma_6t2i", SIZES, stages=AUX_STAGES)
def moma_6t2i(size: str) -> ExperimentConfig:
    """6 text + 2 image expert-choice experts.

    Run: python scripts/train.py --exp moma_6t2i_tiny
    Shows: against moma_4t4i, text loss gained and image loss lost by moving experts to text.
    """
    return moma(size, 6, 2)


@register_sizes("moma_7t1i", SIZES, stages=AUX_STAGES)
def moma_7t1i(size: str) -> ExperimentConfig:
    """7 text + 1 image expert-choice experts.

    Run: python scripts/train.py --exp moma_7t1i_tiny
    Shows: the far end of the text/image split, against moma_6t2i and moma_4t4i.
    """
    return moma(size, 7, 1)


@register_sizes("upcycled_moma_4t4i", SIZES)
def upcycled_moma_4t4i(size: str) -> ExperimentConfig:
    """moma_4t4i upcycled from a moma_1t1i run, Gumbel-sigmoid router noise (MoMa 2.1).

    Run: python scripts/train.py --exp moma_1t1i_tiny --steps S   (the seed run; paper: 10k-20k)
         python scripts/train.py --exp upcycled_moma_4t4i_tiny --init-from runs/moma_1t1i_tiny
    Each modality FFN is copied into all 4 experts of its group, routers start fresh, the LR
    schedule restarts and the data continues where the seed run stopped. A dense_tiny run seeds
    it too (`--init-from runs/dense_tiny`: the dense FFN into every expert of both groups).
    Shows: the upcycled model against moma_4t4i trained from scratch at equal total FLOPs
    (the seed run's FLOPs included; the paper reports a further 1.16-1.2x savings).
    """
    cfg = moma(size, 4, 4)
    moe = dataclasses.replace(cfg.model.moe, router_noise="gumbel")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


@register_sizes("upcycled_dense_moma_4t4i", SIZES)
def upcycled_dense_moma_4t4i(size: str) -> ExperimentConfig:
    """upcycled_moma_4t4i's model, named for its other seed run: a dense run (Llama 3 meets MoE,
    arXiv 2412.09952), whose FFN is copied into every expert of both groups.

    Run: python scripts/train.py --exp dense_tiny --steps S   (the seed run)
         python scripts/train.py --exp upcycled_dense_moma_4t4i_tiny --init-from runs/dense_tiny
         python scripts/compare.py --suite upcycle_tiny   (both seed runs, at equal FLOPs)
    Shows: beside upcycled_moma_4t4i (seeded by moma_1t1i) and moma_4t4i from scratch, whether
    starting from a dense FFN helps as much as from per-modality FFNs.
    """
    return upcycled_moma_4t4i(size)
