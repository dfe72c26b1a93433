"""Dense Chameleon-style baselines: the paper's FLOP-matched sizes and a CPU-sized tiny model.

Shapes follow MoMa (Lin et al. 2024) Table 1: vocabulary 65,536, untied embeddings,
SwiGLU hidden int(2/3 * 4d), params = 2Vd + l(4d^2 + 8d^2). Optimizer and schedule follow
Chameleon: AdamW(0.9, 0.95, eps 1e-5, wd 0.1), clip 1.0, peak LR 1e-4, 4000 warm-up steps,
linear decay to 1% of peak; sequence 4096.
"""

import dataclasses

from moma_jax.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, RunConfig
from moma_jax.registry import register

PAPER_OPTIM = OptimConfig(peak_lr=1e-4, warmup_steps=4000, total_steps=160_000)


def paper_dense(
    n_layers: int, d_model: int, n_heads: int, batch: int, steps: int
) -> ExperimentConfig:
    """A paper-size dense model with the paper's data shape and schedule."""
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


@register("dense_90m")
def dense_90m() -> ExperimentConfig:
    """Dense 90M (8 x 512, 8 heads), 1,536 x 4096 tokens/batch, 160k steps.

    Run: python scripts/train.py --exp dense_90m --set data.path=DIR
    Shows: the FLOP-matched dense baseline for the 90M sparse models (MoMa Table 1).
    """
    return paper_dense(8, 512, 8, batch=1536, steps=160_000)


@register("dense_435m")
def dense_435m() -> ExperimentConfig:
    """Dense 435M (24 x 1024, 16 heads), 1,536 x 4096 tokens/batch, 160k steps.

    Run: python scripts/train.py --exp dense_435m --set data.path=DIR
    Shows: the dense baseline for the 435M sparse models and the throughput comparisons.
    """
    return paper_dense(24, 1024, 16, batch=1536, steps=160_000)


@register("dense_1.4b")
def dense_1_4b() -> ExperimentConfig:
    """Dense 1.4B (24 x 2048, 16 heads), 2,048 x 4096 tokens/batch, 120k steps.

    Run: python scripts/train.py --exp dense_1.4b --set data.path=DIR
    Shows: the baseline against which MoMa reports its 3.7x FLOPs savings.
    """
    return paper_dense(24, 2048, 16, batch=2048, steps=120_000)


@register("dense_tiny")
def dense_tiny() -> ExperimentConfig:
    """Dense tiny (4 x 128) on the bundled data; trains visibly on a 2-core CPU in minutes.

    Run: python scripts/train.py --exp dense_tiny
    Shows: held-out text and image losses falling from ~ln(vocab) within a few hundred steps;
    checkpoints, metrics.jsonl and TensorBoard events in the workdir (runs/dense_tiny).
    """
    return ExperimentConfig(
        model=ModelConfig(vocab_size=1024, d_model=128, n_layers=4, n_heads=4),
        data=DataConfig(seq_len=256, batch_size=16),
        optim=OptimConfig(peak_lr=3e-3, warmup_steps=30, total_steps=300, weight_decay=0.1),
        run=RunConfig(log_every=10, eval_every=50, eval_batches=4, checkpoint_every=100),
    )
