"""The aux-router stages (MoMa 2.1; model/aux_router.py), as suffixes the registry resolves.

An architecture whose routers rank a whole routing group (expert choice with more than one
expert per group, Mixture-of-Depths) is declared with `stages=AUX_STAGES`, which names two
more experiments per size: `{arch}_aux_{size}` (`posthoc`) and `{arch}_joint_aux_{size}`
(`joint`). Causal evaluation and generation need these routers.
"""

import dataclasses

from moma_jax.config import ExperimentConfig, OptimConfig
from moma_jax.registry import AUX_STAGE, Stage

# The post-hoc stage's schedule: MoMa's at the paper sizes (5k-10k steps, LR 1e-4, 1-2k
# warm-up), a short one at the tiny size (after the 300-step mod_moma_4t4i_tiny, 200 steps at
# 1e-2 reach a held-out balanced accuracy of 0.88-0.97 per layer and group; 3e-3 learns about
# half as fast).
STAGE_OPTIM = {
    "tiny": OptimConfig(peak_lr=1e-2, warmup_steps=10, total_steps=200, weight_decay=0.0),
}
PAPER_STAGE = OptimConfig(peak_lr=1e-4, warmup_steps=1000, total_steps=5000, weight_decay=0.0)


def _with_aux(cfg: ExperimentConfig, mode: str) -> ExperimentConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, aux_routers=mode))


def posthoc(cfg: ExperimentConfig, size: str) -> ExperimentConfig:
    """post-hoc aux routers for a finished run (main model loaded and frozen).

    Every parameter of the source run is loaded unchanged and frozen (no optimizer moments);
    only the aux routers train, by binary cross-entropy against the training routers' batch
    top-k decisions, on the data that follows the source run's.

    Run: python scripts/train.py --exp moma_4t4i_tiny
         python scripts/train.py --exp moma_4t4i_aux_tiny --init-from runs/moma_4t4i_tiny
         python scripts/evaluate.py --workdir runs/moma_4t4i_aux_tiny --routing causal
    (at the paper sizes add --set data.path=DIR to both train commands)
    Shows: aux_bce falling and eval_.../aux_balanced_accuracy per layer and group near 1;
    eval_causal_loss_* beside eval_loss_* (teacher forced).
    """
    return dataclasses.replace(_with_aux(cfg, "posthoc"), optim=STAGE_OPTIM.get(size, PAPER_STAGE))


def joint(cfg: ExperimentConfig, size: str) -> ExperimentConfig:
    """aux routers trained jointly (stop-gradient input, own optimizer branch).

    The MoD paper's predictor: the main model trains exactly as without them.

    Run: python scripts/train.py --exp moma_4t4i_joint_aux_tiny
    Shows: eval_causal_loss_* at every evaluation (a causal eta in compare.py) and the aux
    routers' balanced accuracy per layer.
    """
    return _with_aux(cfg, "joint")


AUX_STAGES: dict[str, Stage] = {AUX_STAGE: posthoc, f"joint_{AUX_STAGE}": joint}
