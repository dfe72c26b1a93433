"""Where a training run starts in its own workdir: the latest intact checkpoint, or step 0 only
when there is no earlier run to overwrite.

- The config saved *in* the latest checkpoint is compared with the run's before anything is
  restored (config.json may have been edited to match a changed `--set`): a checkpoint that
  would restore into a different config is not damaged, and the run is refused with the diff,
  touching nothing. So is a checkpoint trained on other data: the manifest saved in it against
  the data's now (`data.content_differences`: a folder prepared again with another seed,
  tokenizer or corpus under the same path, or from an edited input, would resume its data
  position into other records).
- A damaged step (`train.checkpoint.CheckpointDamagedError`) is reported and the one before it
  tried; the damaged ones newer than the step resumed from are moved aside as `STEP.corrupt`
  (kept, and out of the way of the steps this run will save again). If no step is intact,
  nothing is renamed and the run is refused.
- With no checkpoint to resume, a workdir that holds an earlier run (checkpoints under any
  name, metrics of trained steps) is refused unless the user asked for `--restart`, which moves
  that run into `previous-runs/` first (`Workdir.move_aside`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.data import content_differences
from moma_jax.overrides import resume_conflicts
from moma_jax.train.checkpoint import CheckpointDamagedError, RunCheckpoints, move_aside, warn
from moma_jax.train.workdir import PREVIOUS_RUNS, Workdir


def restart(workdir: Workdir) -> None:
    """`--restart`: the earlier run here moves into previous-runs/ (process 0; the others wait)."""
    if jax.process_index() == 0:
        moved = workdir.move_aside()
        if moved is not None:
            print(f"--restart: moved the earlier run in {workdir} to {moved}", flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("moma_jax restart")


def resume(
    cfg: ExperimentConfig,
    workdir: Workdir,
    abstract_state: Any,
    data_iter: Any,
    manifest: dict[str, Any] | None = None,
) -> tuple[int, Any]:
    """(step, state) of the latest intact checkpoint in the workdir, or (0, None) for a fresh
    start; raises ConfigError where either would lose or misread the earlier run (`manifest`:
    the data's now, checked against the one saved with the checkpoint)."""
    ckpts = RunCheckpoints(workdir.checkpoints)
    if ckpts.steps:
        _check_saved_config(cfg, workdir, ckpts)
        if manifest is not None:
            _check_saved_data(cfg, manifest, workdir, ckpts)
    step, state, damaged = ckpts.latest_intact(abstract_state, data_iter)
    if state is not None:
        if jax.process_index() == 0:
            for bad in damaged:
                kept = move_aside(workdir.checkpoints, bad)
                warn(f"moved the damaged checkpoint step {bad} aside to {kept}")
        return step, state
    if damaged:
        raise ConfigError(
            f"every checkpoint in {workdir.checkpoints} is damaged (steps {sorted(damaged)}); "
            "nothing was renamed or deleted. Restore them from a copy, or rerun with --restart "
            f"to move this run aside into {workdir.path / PREVIOUS_RUNS} and start again"
        )
    if prior := workdir.prior_run():
        raise ConfigError(
            f"workdir {workdir} holds an earlier run ({'; '.join(prior)}) but no checkpoint "
            "to resume it from; starting at step 0 would overwrite it. Rerun with --restart to "
            f"move it aside into {workdir.path / PREVIOUS_RUNS} and start again, or use "
            "another --workdir"
        )
    return 0, None


def _newest_readable(ckpts: RunCheckpoints, read: Callable[[int], Any]) -> tuple[int, Any] | None:
    """(step, read(step)) for the newest checkpoint whose item `read` loads (the damaged ones
    newer than it warned about); None if none does."""
    for step in reversed(ckpts.steps):
        try:
            return step, read(step)
        except CheckpointDamagedError as e:
            warn(str(e))
    return None


def _check_saved_config(cfg: ExperimentConfig, workdir: Workdir, ckpts: RunCheckpoints) -> None:
    """Refuses a run whose config differs from the one saved in the newest checkpoint whose
    config reads (keys outside `config.RESUME_SAFE_KEYS`)."""
    found = _newest_readable(ckpts, ckpts.config)
    if found is None:
        return
    step, saved = found
    conflicts = resume_conflicts(saved, cfg)
    old, new = saved.run, cfg.run
    if new.keep_last < old.keep_last or (old.keep_every and new.keep_every != old.keep_every):
        warn(
            f"run.keep_last {old.keep_last} -> {new.keep_last}, run.keep_every "
            f"{old.keep_every} -> {new.keep_every}: at the next save, checkpoints of this "
            "run that the new policy does not keep are deleted"
        )
    if conflicts:
        raise ConfigError(
            f"checkpoint step {step} in {workdir.checkpoints} was trained with a different "
            "config (the one saved in the checkpoint; config.json may have been edited); "
            "resuming would change the run:\n  "
            + "\n  ".join(conflicts)
            + "\nnothing was changed. Use the checkpoint's values, a new --workdir, or "
            f"--restart (moves this run aside into {PREVIOUS_RUNS}/)"
        )


def _check_saved_data(
    cfg: ExperimentConfig, manifest: dict[str, Any], workdir: Workdir, ckpts: RunCheckpoints
) -> None:
    """Refuses a run whose data differs in content from the data saved with the newest
    checkpoint whose manifest reads."""
    found = _newest_readable(ckpts, ckpts.manifest)
    if found is None:
        return
    step, saved = found
    if differ := content_differences(saved, manifest):
        where = cfg.data.path or "the bundled data"
        raise ConfigError(
            f"checkpoint step {step} in {workdir.checkpoints} was trained on other data than "
            f"{where} holds now (its manifest differs in {', '.join(differ)}): resuming would "
            "continue on other records. Nothing was changed. Point data.path at the data it "
            "was trained on (prepare it again as before), or start again with --restart "
            f"(moves this run aside into {PREVIOUS_RUNS}/) or a new --workdir"
        )
