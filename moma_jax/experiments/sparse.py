"""Sparse families at the paper's sizes (90m, 435m, 1.4b) and a CPU-sized tiny size.

Each architecture is its dense base (dense.py: same layers, width, data and
schedule, so the same ideal FLOPs per token) with a different layer kind or routing:

- moe_8x: 8 mixed-modal expert-choice experts, sigmoid router, c = 1 (k = N/8 per expert).
- moma_{a}t{b}i: a text experts and b image experts; tokens go to their modality's group, then
  expert choice inside it (MoMa, Lin et al. 2024). moma_1t1i is pure FFN modality untying.
- mot: Mixture-of-Transformers (Liang et al. 2024): every non-embedding weight per modality.
- switch_8x / gshard_8x: token-choice top-1 / top-2 baselines with capacity factor 1.25, the
  Switch load-balancing loss (0.01) and the ST-MoE router z-loss (0.001).
"""

import dataclasses
from collections.abc import Callable

from moma_jax.config import ExperimentConfig, SparseConfig
from moma_jax.experiments.dense import dense_1_4b, dense_90m, dense_435m, dense_tiny
from moma_jax.registry import register

SIZES: dict[str, Callable[[], ExperimentConfig]] = {
    "90m": dense_90m,
    "435m": dense_435m,
    "1.4b": dense_1_4b,
    "tiny": dense_tiny,
}

MIXED = SparseConfig(group_experts=(8,), modality_group=(0, 0))
TOKEN_CHOICE = dataclasses.replace(
    MIXED, routing="token_choice", router_score="softmax", capacity=1.25
)

ARCHITECTURES: dict[str, tuple[str, SparseConfig | None, str]] = {
    "moe_8x": ("moe", MIXED, "8 mixed-modal expert-choice experts"),
    "moma_1t1i": ("moe", SparseConfig(group_experts=(1, 1)), "one FFN per modality (untying)"),
    "moma_2t2i": ("moe", SparseConfig(group_experts=(2, 2)), "2 text + 2 image EC experts"),
    "moma_4t4i": ("moe", SparseConfig(group_experts=(4, 4)), "4 text + 4 image EC experts"),
    "moma_6t2i": ("moe", SparseConfig(group_experts=(6, 2)), "6 text + 2 image EC experts"),
    "moma_7t1i": ("moe", SparseConfig(group_experts=(7, 1)), "7 text + 1 image EC experts"),
    "mot": ("mot", None, "Mixture-of-Transformers: all non-embedding weights per modality"),
    "switch_8x": ("moe", TOKEN_CHOICE, "8 mixed experts, token-choice top-1 (Switch)"),
    "gshard_8x": ("moe", dataclasses.replace(TOKEN_CHOICE, top_k=2), "token-choice top-2"),
}


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


def _register(arch: str, size: str) -> None:
    kind, moe, summary = ARCHITECTURES[arch]
    name = f"{arch}_{size}"

    def experiment() -> ExperimentConfig:
        return sparse_variant(SIZES[size](), kind, moe)

    experiment.__doc__ = (
        f"{arch} at the {size} dense shape: {summary}.\n\n"
        f"Run: python scripts/train.py --exp {name}"
        + (" --set data.path=DIR" if size != "tiny" else "")
        + f"\nDescribe: python scripts/describe.py --exp {name}\n"
        f"Shows: per-modality losses against dense_{size} at equal ideal FLOPs per token, with "
        "expert loads, router scores, dropped tokens and wasted slots in metrics.jsonl."
    )
    experiment.__name__ = name.replace(".", "_")
    register(name)(experiment)


for _arch in ARCHITECTURES:
    for _size in SIZES:
        _register(_arch, _size)


def _register_upcycled(size: str) -> None:
    name = f"upcycled_moma_4t4i_{size}"

    def experiment() -> ExperimentConfig:
        cfg = sparse_variant(SIZES[size](), "moe", ARCHITECTURES["moma_4t4i"][1])
        moe = dataclasses.replace(cfg.model.moe, router_noise="gumbel")
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))

    seed = f"moma_1t1i_{size}"
    experiment.__doc__ = (
        f"moma_4t4i upcycled from a {seed} run, Gumbel-sigmoid router noise (MoMa 2.1).\n\n"
        f"Run: python scripts/train.py --exp {seed} --steps S   (the seed run; paper: 10k-20k)\n"
        f"     python scripts/train.py --exp {name} --init-from runs/{seed}\n"
        "Each modality FFN is copied into all 4 experts of its group, routers start fresh, the "
        "LR schedule restarts and the data continues where the seed run stopped.\n"
        "Shows: the upcycled model overtakes moma_4t4i trained from scratch at equal total "
        "FLOPs (seed run's FLOPs included; the paper reports a further 1.16-1.2x)."
    )
    experiment.__name__ = name.replace(".", "_")
    register(name)(experiment)


for _size in SIZES:
    _register_upcycled(_size)


# Mixture-of-Depths in alternating layers from layer 0 (MoMa 2.1): mod_{base} wraps the base
# architecture's layer kind; capacity 0.25 (model.mod.capacity). At the paper sizes the MoD
# models are deeper/wider to match the dense model's FLOPs (DESIGN.md 2.1, Table 1): 90m
# 14 x 512, 435m 40 x 1024, 1.4b 32 x 2304 with 18 heads (head_dim 128, as 2048 / 16).
MOD_BASES = {"dense": ("dense", None), "moma_1t1i": ARCHITECTURES["moma_1t1i"][:2]}
MOD_BASES["moma_4t4i"] = ARCHITECTURES["moma_4t4i"][:2]
MOD_SHAPES = {"90m": (14, 512, 8), "435m": (40, 1024, 16), "1.4b": (32, 2304, 18)}


def _register_mod(base: str, size: str) -> None:
    kind, moe = MOD_BASES[base]
    name = f"mod_{base}_{size}"

    def experiment() -> ExperimentConfig:
        cfg = sparse_variant(SIZES[size](), kind, moe or SparseConfig())
        model = dataclasses.replace(cfg.model, layer_pattern=(f"mod_{kind}", kind))
        if size in MOD_SHAPES:
            layers, d, heads = MOD_SHAPES[size]
            model = dataclasses.replace(model, n_layers=layers, d_model=d, n_heads=heads)
        return dataclasses.replace(cfg, model=model)

    run = f"python scripts/train.py --exp {name}" + (
        " --set data.path=DIR" if size != "tiny" else ""
    )
    experiment.__doc__ = (
        f"{base} with Mixture-of-Depths in every other layer (from layer 0), capacity 0.25"
        + (f", {MOD_SHAPES[size][0]} x {MOD_SHAPES[size][1]}" if size in MOD_SHAPES else "")
        + f".\n\nRun: {run}\n"
        f"Describe: python scripts/describe.py --exp {name}\n"
        "Shows: the MoD layers' executed FLOPs at about a quarter of their dense counterparts "
        "(describe), mod/keep_frac and mod/weight_mean in metrics.jsonl, and the losses against "
        f"{base}_{size} per FLOP."
    )
    experiment.__name__ = name.replace(".", "_")
    register(name)(experiment)


for _base in MOD_BASES:
    for _size in SIZES:
        _register_mod(_base, _size)
