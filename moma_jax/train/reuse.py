"""Runs shared between suites under one --root: a suite's run that another suite there already
trained to the end, with the same experiment, seed and config, is copied instead of trained
again (`compare.py --no-reuse` trains everything). paper_tiny, expert_split_tiny and
causal_routers_tiny share their dense and moma runs this way.

- A twin is ROOT/OTHER_SUITE/EXPERIMENT/seedS (or a budget's ROOT/SUITE/tppB/...) whose saved
  config equals the run's in every key that changes what it computes (`resume_conflicts`) and
  whose `run.init_from`, where set, names the same run or a copy of it (`reused_from.json`
  followed back); finished means a committed checkpoint at `optim.total_steps` and metrics up
  to it.
- Only a run whose directory does not exist yet is filled: the twin's run files are copied
  into a temporary folder beside it, under the twin's lock, then renamed into place, so a
  killed copy leaves no half run. `reused_from.json` records the twin. Nothing of the twin is
  changed, and the copy is a run of its own from then on.

The copied run is the twin's, trained by the code of its time, like any run a suite resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.overrides import resume_conflicts
from moma_jax.runtime import resolve_shares
from moma_jax.train.checkpoint import committed_steps
from moma_jax.train.faults import WorkdirBusyError, WorkdirLock
from moma_jax.train.metrics import logged_steps
from moma_jax.train.workdir import RUN_FILES, Workdir

REUSED_FROM = "reused_from.json"


def reused_from(workdir: Path) -> Path | None:
    """The run this workdir's run was copied from (its `reused_from.json`), or None."""
    try:
        return Path(json.loads((Path(workdir) / REUSED_FROM).read_text())["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _origin(run: str) -> Path:
    """The run a workdir's run was first trained in: `reused_from.json` followed back."""
    path = Path(run).resolve()
    for _ in range(100):  # a chain of copies; a (hand-made) cycle stops somewhere
        source = reused_from(path)
        if source is None:
            break
        path = source.resolve()
    return path


def _same_source(ours: str, theirs: str) -> bool:
    """Two `run.init_from` values name the same run: equal, or copies of one run."""
    if ours == theirs:
        return True
    return bool(ours and theirs) and _origin(ours) == _origin(theirs)


def _finished(workdir: Path, cfg: ExperimentConfig) -> bool:
    steps = committed_steps(workdir / "checkpoints")
    logged = logged_steps(workdir / "metrics.jsonl")
    end = cfg.optim.total_steps
    return bool(steps) and steps[-1] == end and bool(logged) and max(logged) >= end


def is_twin(candidate: Path, cfg: ExperimentConfig) -> bool:
    """Whether `candidate` holds a finished run of `cfg` (same experiment, same computation)."""
    if any((candidate / name).is_symlink() for name in RUN_FILES):
        return False
    try:
        saved = Workdir(candidate).read_config()
    except ConfigError:
        return False
    if saved is None or saved.name != cfg.name or resume_conflicts(saved, cfg):
        return False
    return _same_source(cfg.run.init_from, saved.run.init_from) and _finished(candidate, saved)


def find_twin(root: Path, workdir: Path, cfg: ExperimentConfig) -> Path | None:
    """A finished twin of the run for `workdir` (ROOT/SUITE[/tppB]/EXP/seedS) elsewhere under
    `root`, the first in name order; None if there is none."""
    exp, seed = workdir.parent.name, workdir.name
    here = workdir.absolute()
    found = [
        candidate
        for pattern in (f"*/{exp}/{seed}", f"*/*/{exp}/{seed}")
        for candidate in sorted(Path(root).glob(pattern))
        if candidate.absolute() != here
    ]
    if found:
        cfg = resolve_shares(cfg)  # as training fills them in (and saves them)
    return next((c for c in found if is_twin(c, cfg)), None)


def reuse(root: Path, workdir: Path, cfg: ExperimentConfig) -> Path | None:
    """Fills an absent `workdir` with a copy of its twin's run; returns the twin, or None (the
    run is trained as usual) when it exists already or no twin is free to copy."""
    if workdir.exists() or workdir.is_symlink():
        return None
    cfg = resolve_shares(cfg)
    twin = find_twin(root, workdir, cfg)
    if twin is None:
        return None
    tmp = workdir.parent / f".{workdir.name}.copying-{os.getpid()}"
    try:
        with WorkdirLock(twin):  # no run writes the twin while it is copied
            if not is_twin(twin, cfg):
                return None
            tmp.mkdir(parents=True)
            for name in RUN_FILES:
                src = twin / name
                if src.is_dir():
                    shutil.copytree(src, tmp / name, symlinks=True)
                elif src.exists():
                    shutil.copy2(src, tmp / name)
    except WorkdirBusyError:
        return None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder only
        raise
    record = {"source": str(twin.resolve()), "copied": time.strftime("%Y-%m-%d %H:%M:%S")}
    (tmp / REUSED_FROM).write_text(json.dumps(record) + "\n")
    os.rename(tmp, workdir)  # one compare.py per root: the name is still free
    print(f"[compare] {cfg.name}: reused the finished run {twin}", file=sys.stderr, flush=True)
    return twin
