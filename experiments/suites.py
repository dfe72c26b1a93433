"""The named comparison suites `python scripts/compare.py --suite NAME` runs (docs/comparison.md).

Each lists experiments trained on the same data, tokens, schedule and seeds, then compared at
equal FLOPs; the first is the dense reference. `moma_jax.suites` is the mechanism.

Run: python scripts/compare.py --suite paper_tiny
     python scripts/compare.py --suite tokens_per_param_64
Shows: eta (the sparse model's FLOPs savings against dense) per modality, per seed and as a
geometric mean with its 95% interval beside the noise floor of dense against dense, with the
causal losses of the aux-router stages (`aux_stages=True`), in the suite's report.md; for the
tokens-per-parameter suites also scaling.md (fits across budgets).
"""

from moma_jax.suites import Suite, Upstream, register_suite

_ARCHS = ("dense", "moe_8x", "moma_1t1i", "moma_4t4i", "mot")

register_suite(
    Suite(
        "paper_tiny",
        (*(f"{a}_tiny" for a in _ARCHS), "mod_moma_4t4i_tiny"),
        seeds=5,
        description="The MoMa paper's comparison at the tiny size on the bundled data: dense, "
        "moe_8x, moma_1t1i, moma_4t4i, mot and mod_moma_4t4i, 5 seeds, with the post-hoc "
        "aux-router stages for causal losses (~2 h on a 2-core CPU).",
        aux_stages=True,
    )
)
for size in ("90m", "435m", "1.4b"):
    register_suite(
        Suite(
            f"paper_{size}",
            (*(f"{a}_{size}" for a in _ARCHS), f"mod_moma_4t4i_{size}"),
            seeds=1,
            description=f"The paper's comparison at {size} (real hardware; set data.path).",
            aux_stages=True,
        )
    )


# The routing family (docs/sparsity.md), 3 seeds each at the tiny size, against dense_tiny.
register_suite(
    Suite(
        "expert_split_tiny",
        (
            "dense_tiny",
            "moma_1t1i_tiny",
            "moma_2t2i_tiny",
            "moma_4t4i_tiny",
            "moma_6t2i_tiny",
            "moma_7t1i_tiny",
        ),  # fmt: skip
        seeds=3,
        aux_stages=True,
        description="The MoMa paper's split of experts between text and image (1t1i to 7t1i), "
        "with causal losses from the aux-router stages.",
    )
)
register_suite(
    Suite(
        "granularity_tiny",
        (
            "dense_tiny",
            "moma_4t4i_tiny",
            "moma_fine2_tiny",
            "moma_fine4_tiny",
            "moma_fine8_tiny",
            "moma_fine2_shared_tiny",
            "moma_4t4i_shared_tiny",
            "moma_fine8_shared_tiny",
        ),  # fmt: skip
        seeds=3,
        description="DeepSeekMoE's fine-grained experts in MoMa's groups: granularity 1, 2, 4 "
        "and 8, without and with one shared expert, all at dense's ideal FLOPs per token.",
    )
)
register_suite(
    Suite(
        "causal_routers_tiny",
        (
            "dense_tiny",
            "moma_4t4i_tiny",
            "moma_4t4i_topp_tiny",
            "moma_4t4i_null_tiny",
            "moma_4t4i_remoe_tiny",
            "moma_4t4i_topany_tiny",
        ),
        seeds=3,
        aux_stages=True,
        description="Expert choice with post-hoc aux routers against per-token routers that "
        "need none (top-p, null experts, ReMoE, DynMoE's top-any): teacher-forced and causal "
        "losses; experts per token in each run's metrics. Equal steps, equal ideal FLOPs: the "
        "per-token routers' measured experts per token run above the 1 their ideal FLOPs "
        "assume early in training (top-p 1.4-2, top-any about 2 at the start, ReMoE 2-3 until "
        "its coefficient grows), so they compute more than the others; read their "
        "experts_per_token beside their losses.",
    )
)
register_suite(
    Suite(
        "mod_variants_tiny",
        ("dense_tiny", "mod_dense_tiny", "mod_moma_1t1i_tiny", "mod_moma_4t4i_tiny"),
        seeds=3,
        match_flops=True,
        aux_stages=True,
        description="Mixture-of-Depths over dense, moma_1t1i and moma_4t4i blocks, every run "
        "to dense's total FLOPs.",
    )
)


# Ablations of the tiny comparison (experiments/ablations.py), 3 seeds each; the first entry
# of each suite is its dense reference.
register_suite(
    Suite(
        "ablation_tiny",
        (
            "dense_tiny",
            "moma_4t4i_tiny",
            "moe_8x_tiny",
            "switch_8x_tiny",
            "moma_4t4i_c2_tiny",
            "moe_8x_c2_tiny",
            "moma_4t4i_lrhalf_tiny",
            "moma_4t4i_lrdouble_tiny",
        ),  # fmt: skip
        seeds=3,
        match_flops=True,
        description="Capacity 2, token choice (switch_8x: only capacity overflow goes untaken, "
        "counted) and the sparse learning rate against dense_tiny, every run trained to "
        "dense's total FLOPs (capacity 2: fewer steps).",
    )
)
for _variant in ("prenorm", "wide"):
    register_suite(
        Suite(
            f"ablation_{_variant}_tiny",
            (f"dense_{_variant}_tiny", f"moma_4t4i_{_variant}_tiny"),
            seeds=3,
            match_flops=True,
            description=f"dense vs moma_4t4i, both {_variant}, at equal total FLOPs.",
        )
    )

# The data regime: the tiny models shrunk to 4 x 64 (328K parameters) so that 1,600 steps of
# 4,096 tokens are 20 tokens per dense parameter -- within one epoch of the large bundle
# (0.51 epochs of its 12.9M training tokens), or 2.9 epochs of the standard one.
MICRO = (
    "model.d_model=64", "model.n_heads=2", "optim.total_steps=1600", "optim.warmup_steps=100",
    "run.eval_every=200", "run.checkpoint_every=400",
)  # fmt: skip
for _name, _data in (("large", "bundled-large"), ("standard", "")):
    register_suite(
        Suite(
            f"ablation_data_micro_{_name}",
            ("dense_tiny", "moma_4t4i_tiny"),
            seeds=3,
            overrides=(*MICRO, f"data.path={_data}"),
            description=f"dense vs moma_4t4i at 4 x 64, 20 tokens per dense parameter, on the "
            f"{_name} bundle.",
        )
    )

# The paper's comparison in the regime where the tiny scale shows it (the data-regime ablation:
# 4 x 64 at 20 tokens per dense parameter within one epoch of the large bundle).
register_suite(
    Suite(
        "paper_micro",
        (*(f"{a}_tiny" for a in _ARCHS), "mod_moma_4t4i_tiny"),
        seeds=3,
        overrides=(*MICRO, "data.path=bundled-large"),
        description="paper_tiny's experiments at 4 x 64 on the large bundle, 1,600 steps: 20 "
        "tokens per dense parameter in 0.51 epochs (~2.5 h on a 2-core CPU).",
        aux_stages=True,
    )
)

# The data regime at fixed width: every budget (real training tokens per dense parameter) its
# own runs with its own schedule, so the gap from dense can be read against the budget with
# nothing else changing; scaling.md fits L(F) = E + A F^-alpha per architecture.
register_suite(
    Suite(
        "tokens_per_param_64",
        ("dense_tiny", "moma_4t4i_tiny", "moe_8x_tiny", "mot_tiny"),
        seeds=3,
        overrides=("model.d_model=64", "model.n_heads=2", "data.path=bundled-large"),
        match_flops=True,
        tokens_per_param=(1, 4, 10, 20),
        description="4 x 64 (328K dense parameters) at 1, 4, 10 and 20 real tokens per dense "
        "parameter on the large bundle, 3 seeds (~2.5 h on a 2-core CPU).",
    )
)
register_suite(
    Suite(
        "tokens_per_param_128",
        ("dense_tiny", "moma_4t4i_tiny"),
        seeds=3,
        overrides=("data.path=bundled-large",),
        match_flops=True,
        tokens_per_param=(1, 4, 10),
        description="4 x 128 at 1, 4 and 10 real tokens per dense parameter on the large "
        "bundle, 3 seeds (~5 h on a 2-core CPU).",
    )
)
register_suite(
    Suite(
        "upcycle_tiny",
        (
            "dense_tiny",
            "moma_4t4i_tiny",
            "upcycled_moma_4t4i_tiny",
            "upcycled_dense_moma_4t4i_tiny",
        ),
        seeds=3,
        match_flops=True,
        upstream=(
            ("upcycled_moma_4t4i_tiny", Upstream("moma_1t1i_tiny", 0.5)),
            ("upcycled_dense_moma_4t4i_tiny", Upstream("dense_tiny", 0.5)),
        ),
        description="moma_4t4i from scratch against moma_4t4i upcycled (Gumbel-sigmoid router "
        "noise, as MoMa 2.1) from a moma_1t1i run and from a dense run, each seed run trained "
        "to half of dense's total FLOPs with its own schedule, the upcycled run to the rest "
        "(its FLOPs axis counts the seed run's): every model at dense's total FLOPs. The "
        "upcycled runs differ from scratch in their start and in router noise.",
    )
)
register_suite(
    Suite(
        "modality_aware_parts_tiny",
        (
            "dense_tiny",
            "mot_tiny",
            "moma_4t4i_tiny",
            "mom_tiny",
            "moh_tiny",
            "switchhead_tiny",
            "mixture_of_tokens_tiny",
        ),
        seeds=3,
        match_flops=True,
        aux_stages=True,
        description="Which part of the layer is modality-aware or sparse, at dense's total "
        "FLOPs: everything (MoT), the FFN (MoMa), the token mixer of a Mamba model (Mixture-of-"
        "Mamba; its baseline is mamba in ssm_tiny, not dense attention), the attention heads "
        "(MoH) or value/output projections (SwitchHead) per modality, and Mixture of Tokens "
        "(not modality-aware: mixes rows at a position).",
    )
)
register_suite(
    Suite(
        "ssm_tiny",
        ("dense_tiny", "mamba_tiny", "mom_tiny", "moe_mamba_tiny"),
        seeds=3,
        match_flops=True,
        aux_stages=True,
        description="State-space layers at dense's total FLOPs: Mamba + SwiGLU, Mixture-of-Mamba "
        "(projections per modality) and Mamba + MoMa's expert groups (MoE-Mamba), against the "
        "attention dense model.",
    )
)
