"""Training budgets for comparison suites: steps for a FLOPs budget or a tokens-per-parameter
budget, each run with its own full schedule (`moma_jax.suites`).

Tokens per parameter counts real training tokens (not padding) per dense-model parameter, the
way data-regime papers count them: steps = budget x parameters / real tokens per step, with the
real share of a step measured on the first batches of the run's own training stream.
"""

from __future__ import annotations

import math

import numpy as np

from moma_jax import data as data_lib
from moma_jax.config import ExperimentConfig
from moma_jax.flops import count_params
from moma_jax.model.kinds import train_flops_per_token
from moma_jax.runtime import resolve_shares
from moma_jax.train.state import abstract_params

EVALUATIONS = 8  # held-out evaluations per budget run (plus step 0)


def tokens_per_step(cfg: ExperimentConfig) -> int:
    return cfg.data.batch_size * cfg.data.seq_len


def flops_per_step(cfg: ExperimentConfig) -> float:
    """Ideal training FLOPs of one step, as the metrics count them (modality shares from the
    data, as training fills them)."""
    cfg = resolve_shares(cfg)
    return train_flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step(cfg)


def total_flops(cfg: ExperimentConfig) -> float:
    """Training FLOPs of the whole run."""
    return flops_per_step(cfg) * cfg.optim.total_steps


def real_token_share(cfg: ExperimentConfig, batches: int = 16) -> float:
    """The share of a training batch's slots that hold a real token (segment id > 0), on the
    first `batches` batches of the run's training stream."""
    stream = data_lib.make_train_iterator(
        data_lib.ensure_data(cfg.data.path or None),
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        seed=cfg.data.seed,
    )
    real = [float(np.mean(next(stream)["segment_ids"] > 0)) for _ in range(batches)]
    return float(np.mean(real))


def dense_params(cfg: ExperimentConfig) -> int:
    return count_params(abstract_params(cfg)[1])


def steps_for_tokens_per_param(cfg: ExperimentConfig, tokens_per_param: float) -> int:
    """Steps that give `cfg`'s model `tokens_per_param` real training tokens per parameter."""
    real = tokens_per_step(cfg) * real_token_share(cfg)
    return max(1, round(tokens_per_param * dense_params(cfg) / real))


def steps_for_flops(cfg: ExperimentConfig, flops: float) -> int:
    """Steps that give `cfg`'s model `flops` training FLOPs (to the nearest step)."""
    return max(1, round(flops / flops_per_step(cfg)))


def schedule_keys(cfg: ExperimentConfig, steps: int, cadence: bool = False) -> list[str]:
    """--set keys for a run of `steps` with its own full schedule: warm-up at the config's
    share of its steps; with `cadence`, at most EVALUATIONS evaluations and checkpoints at half that
    rate (the run's last step is always evaluated and saved)."""
    share = cfg.optim.warmup_steps / cfg.optim.total_steps
    keys = [f"optim.total_steps={steps}", f"optim.warmup_steps={max(1, round(share * steps))}"]
    if cadence:
        every = max(1, math.ceil(steps / EVALUATIONS))
        keys += [f"run.eval_every={every}", f"run.checkpoint_every={2 * every}"]
    return keys
