"""Auxiliary routers for causal evaluation and generation (MoMa 2.1; model/aux_router.py).

Every architecture whose routers rank a whole routing group (expert choice with more than one
expert per group, Mixture-of-Depths) gets two experiments:

- `{arch}_aux_{size}`: the paper's post-hoc stage. `--init-from` a finished `{arch}_{size}`
  run: every parameter is loaded unchanged and frozen (no optimizer moments), and only the aux
  routers train, by binary cross-entropy against the training routers' batch top-k decisions,
  on the data that follows the source run's (MoMa: 5k-10k steps, LR 1e-4, 1-2k warm-up).
- `{arch}_joint_aux_{size}`: trained with the model from scratch (the MoD paper's predictor):
  the aux routers' input is under stop-gradient and they have their own optimizer branch, so
  the main model trains exactly as `{arch}_{size}` does.
"""

import dataclasses

from moma_jax.config import ExperimentConfig, OptimConfig
from moma_jax.experiments.sparse import SIZES
from moma_jax.registry import get, register

ARCHS: tuple[str, ...] = ("moe_8x", "moma_2t2i", "moma_4t4i", "moma_6t2i", "moma_7t1i")
ARCHS += ("mod_dense", "mod_moma_1t1i", "mod_moma_4t4i")

# The post-hoc stage's schedule: MoMa's at the paper sizes, a short one at the tiny size (after
# the 300-step mod_moma_4t4i_tiny, 200 steps at 1e-2 reach a held-out balanced accuracy of
# 0.88-0.97 per layer and group; 3e-3 learns about half as fast).
STAGE_OPTIM = {
    "tiny": OptimConfig(peak_lr=1e-2, warmup_steps=10, total_steps=200, weight_decay=0.0),
}
PAPER_STAGE = OptimConfig(peak_lr=1e-4, warmup_steps=1000, total_steps=5000, weight_decay=0.0)


def stage_name(experiment: str) -> str:
    """The post-hoc aux-router stage of an experiment: moma_4t4i_tiny -> moma_4t4i_aux_tiny."""
    arch, _, size = experiment.rpartition("_")
    return f"{arch}_aux_{size}"


def _with_aux(cfg: ExperimentConfig, mode: str) -> ExperimentConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, aux_routers=mode))


def _register(arch: str, size: str) -> None:
    base = f"{arch}_{size}"
    posthoc, joint = f"{arch}_aux_{size}", f"{arch}_joint_aux_{size}"
    data = "" if size == "tiny" else " --set data.path=DIR"

    def stage() -> ExperimentConfig:
        cfg = _with_aux(get(base), "posthoc")
        return dataclasses.replace(cfg, optim=STAGE_OPTIM.get(size, PAPER_STAGE))

    stage.__doc__ = (
        f"Post-hoc auxiliary routers for a finished {base} run (main model loaded and frozen).\n\n"
        f"Run: python scripts/train.py --exp {base}{data}\n"
        f"     python scripts/train.py --exp {posthoc} --init-from runs/{base}{data}\n"
        f"     python scripts/evaluate.py --workdir runs/{posthoc} --routing causal\n"
        "Shows: aux_bce falling and eval_.../aux_balanced_accuracy per layer and group near 1; "
        "eval_causal_loss_* beside eval_loss_* (teacher forced)."
    )

    def together() -> ExperimentConfig:
        return _with_aux(get(base), "joint")

    together.__doc__ = (
        f"{base} with auxiliary routers trained jointly (stop-gradient input, own optimizer "
        "branch: the main model trains as without them).\n\n"
        f"Run: python scripts/train.py --exp {joint}{data}\n"
        "Shows: eval_causal_loss_* at every evaluation (a causal eta in compare.py) and the aux "
        "routers' balanced accuracy per layer."
    )
    for name, fn in ((posthoc, stage), (joint, together)):
        fn.__name__ = name.replace(".", "_")
        register(name)(fn)


for _arch in ARCHS:
    for _size in SIZES:
        _register(_arch, _size)
