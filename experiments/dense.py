"""Dense Chameleon-style baselines, and the sizes every architecture is declared at.

Shapes follow MoMa (Lin et al. 2024) Table 1: vocabulary 65,536, untied embeddings,
SwiGLU hidden int(2/3 * 4d), params = 2Vd + l(4d^2 + 8d^2). Optimizer and schedule follow
Chameleon: AdamW(0.9, 0.95, eps 1e-5, wd 0.1), clip 1.0, peak LR 1e-4, 4000 warm-up steps,
linear decay to 1% of peak; sequence 4096. The tiny size trains on a 2-core CPU in minutes.
"""

import dataclasses

from moma_jax.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, RunConfig
from moma_jax.registry import register_sizes

PAPER_OPTIM = OptimConfig(peak_lr=1e-4, warmup_steps=4000, total_steps=160_000)

# size -> (layers, d_model, heads, sequences per batch, steps): MoMa Table 1's dense shapes,
# FLOP-matched to the sparse models of the same size.
PAPER_SIZES = {
    "90m": (8, 512, 8, 1536, 160_000),
    "435m": (24, 1024, 16, 1536, 160_000),
    "1.4b": (24, 2048, 16, 2048, 120_000),
}
SIZES = (*PAPER_SIZES, "tiny")

TINY = ExperimentConfig(
    model=ModelConfig(vocab_size=1024, d_model=128, n_layers=4, n_heads=4),
    data=DataConfig(seq_len=256, batch_size=16),
    optim=OptimConfig(peak_lr=3e-3, warmup_steps=30, total_steps=300, weight_decay=0.1),
    run=RunConfig(log_every=10, eval_every=50, eval_batches=30, checkpoint_every=100),
)


@register_sizes("dense", SIZES)
def dense(size: str) -> ExperimentConfig:
    """Dense baseline: 90m 8 x 512, 435m 24 x 1024, 1.4b 24 x 2048; tiny 4 x 128 on CPU.

    Run: python scripts/train.py --exp dense_tiny
         python scripts/train.py --exp dense_1.4b --set data.path=DIR
    Shows: held-out text and image losses falling from ~ln(vocab) within a few hundred steps
    (tiny; checkpoints, metrics.jsonl and TensorBoard events in runs/dense_tiny); at the paper
    sizes, the FLOP-matched baseline against which MoMa reports its FLOPs savings.
    """
    if size == "tiny":
        return TINY
    n_layers, d_model, n_heads, batch, steps = PAPER_SIZES[size]
    return ExperimentConfig(
        model=ModelConfig(
            vocab_size=65_536,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            compute_dtype="bfloat16",
            remat="dots",
        ),
        data=DataConfig(seq_len=4096, batch_size=batch),
        optim=dataclasses.replace(PAPER_OPTIM, total_steps=steps),
        run=RunConfig(eval_every=1000, checkpoint_every=1000, keep_every=10_000),
    )
