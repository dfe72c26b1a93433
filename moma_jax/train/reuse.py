"""Runs shared between suites under one --root: a suite's run that another suite there already
trained to the end, with the same experiment, seed and config, is copied instead of trained
again (`compare.py --no-reuse` trains everything). paper_tiny, expert_split_tiny,
causal_routers_tiny and granularity_tiny share their dense and moma runs this way.

- A twin is ROOT/OTHER_SUITE/EXPERIMENT/seedS (or a budget's ROOT/SUITE/tppB/...) with the same
  experiment and config (keys outside `MAY_DIFFER`) in its config.json and its last
  checkpoint, on the same data (the content of the manifest saved with that checkpoint),
  finished (a committed checkpoint at `optim.total_steps`, metrics up to it) and, where the
  run starts from another (`run.init_from`: an aux stage, an upcycled run), started from the
  state that run ended with (the state fingerprints of the two checkpoints, so a copy of the
  source matches).
- Only a run whose directory does not exist yet is filled: the twin's run files are copied
  into a temporary folder beside it, under the twin's lock, then renamed into place, so a
  killed copy leaves no half run (its folder is named at the next copy). `reused_from.json`
  records the twin. Nothing of the twin is changed, and the copy is a run of its own from then
  on: `compare.py` resumes it at once (its checkpoint verified, nothing trained).

The copied run is the twin's, trained by the code of its time, like any run a suite resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

from moma_jax import data as data_lib
from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.overrides import config_diff
from moma_jax.runtime import with_data_shares
from moma_jax.train.checkpoint import CheckpointDamagedError, RunCheckpoints, committed_steps
from moma_jax.train.faults import WorkdirBusyError, WorkdirLock
from moma_jax.train.metrics import logged_steps
from moma_jax.train.workdir import REUSED_FROM, RUN_FILES, Workdir

# Keys a copy may differ in: none changes a number the run computed or the report reads (log
# and evaluation cadence, held-out batches, mesh and compile keys all must match). The source of
# an init_from run is matched on its own (`_same_source`).
MAY_DIFFER = frozenset(
    {"description", "run.init_from", "run.async_checkpoint", "run.keep_last", "run.keep_every"}
)


def _same_source(ours: str, candidate: Path) -> bool:
    """The candidate started from the state our source run (`ours`: our `run.init_from`, a
    finished run) ended with: its `init_from.json` names a run whose checkpoint at the step it
    loaded has the same state fingerprint as ours at its last step (content, not paths: a copy
    or a hand-copied source matches, a source retrained since does not)."""
    if not ours:
        return not (candidate / "init_from.json").exists()
    try:
        record = json.loads((candidate / "init_from.json").read_text())
        source_cfg = Workdir(Path(ours)).read_config()
        if not isinstance(record, dict) or source_cfg is None:
            return False
        theirs = RunCheckpoints(Path(str(record["source"])) / "checkpoints")
        mine = RunCheckpoints(Path(ours) / "checkpoints")
        end = source_cfg.optim.total_steps
        return theirs.state_fingerprint(int(record["source_step"])) == mine.state_fingerprint(end)
    except (OSError, ValueError, KeyError, TypeError, ConfigError, CheckpointDamagedError):
        return False


def _same_data(ckpts: RunCheckpoints, step: int, cfg: ExperimentConfig, here: dict) -> bool:
    """The candidate trained on the data whose manifest is `here` (the content of the manifest
    saved with its last step, `data.content_differences`), with as many processes where that
    sets the batch order (`data.streams=0`)."""
    try:
        saved = ckpts.manifest(step)
        processes = ckpts.processes(step)
    except CheckpointDamagedError:
        return False
    return not data_lib.content_differences(saved, here) and (
        cfg.data.streams > 0 or processes == jax.process_count()
    )


def is_twin(candidate: Path, cfg: ExperimentConfig, manifest: dict | None = None) -> bool:
    """Whether `candidate` holds a finished run of `cfg`: the same experiment and config (keys
    outside `MAY_DIFFER`), in its config.json and in its last checkpoint, the same data, the
    same source state where it starts from one, a committed checkpoint at `optim.total_steps`
    and metrics up to it. The checkpoint's state is verified when the copy resumes. A candidate
    this process cannot read is not a twin. `manifest`: the data's here (default: loaded)."""
    if manifest is None:
        manifest = data_lib.load_manifest(data_lib.ensure_data(cfg.data.path or None))
    try:
        return _is_twin(candidate, cfg, manifest)
    except OSError:
        return False


def _is_twin(candidate: Path, cfg: ExperimentConfig, here: dict) -> bool:
    if any((candidate / name).is_symlink() for name in RUN_FILES):
        return False
    try:
        saved = Workdir(candidate).read_config()
    except ConfigError:
        return False
    end = cfg.optim.total_steps
    ckpts = RunCheckpoints(candidate / "checkpoints")
    if saved is None or saved.name != cfg.name or config_diff(saved, cfg, MAY_DIFFER.__contains__):
        return False
    if committed_steps(ckpts.directory)[-1:] != [end]:
        return False
    if max(logged_steps(candidate / "metrics.jsonl"), default=0) < end:
        return False
    try:
        in_checkpoint = ckpts.config(end)
    except CheckpointDamagedError:
        return False
    if config_diff(in_checkpoint, cfg, MAY_DIFFER.__contains__):
        return False
    return _same_data(ckpts, end, cfg, here) and _same_source(cfg.run.init_from, candidate)


def find_twin(
    root: Path, workdir: Path, cfg: ExperimentConfig
) -> tuple[Path, ExperimentConfig] | None:
    """A finished twin of the run for `workdir` (ROOT/SUITE[/tppB]/EXP/seedS) elsewhere under
    `root`, the first in name order, with `cfg` as training resolves it; None if none."""
    exp, seed = workdir.parent.name, workdir.name
    here = workdir.absolute()
    found = [
        candidate
        for pattern in (f"*/{exp}/{seed}", f"*/*/{exp}/{seed}")
        for candidate in sorted(Path(root).glob(pattern))
        if candidate.absolute() != here
    ]
    if not found:
        return None
    manifest = data_lib.load_manifest(data_lib.ensure_data(cfg.data.path or None))
    cfg = with_data_shares(cfg, manifest)  # as training fills them in (and saves them)
    twin = next((c for c in found if is_twin(c, cfg, manifest)), None)
    return None if twin is None else (twin, cfg)


def reuse(root: Path, workdir: Path, cfg: ExperimentConfig) -> Path | None:
    """Fills an absent `workdir` with a copy of its twin's run; returns the twin, or None (the
    run is trained as usual) when it exists already, no twin is free to copy, or the copy
    fails (said on stderr; nothing of it is left)."""
    if workdir.exists() or workdir.is_symlink():
        return None
    found = find_twin(root, workdir, cfg)
    if found is None:
        return None
    twin, cfg = found
    tmp: Path | None = None
    try:
        workdir.parent.mkdir(parents=True, exist_ok=True)
        for stale in workdir.parent.glob(f".{workdir.name}.copying-*"):
            print(f"[compare] a copy interrupted earlier was left in {stale}", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{workdir.name}.copying-", dir=workdir.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # as a directory the run would make (mkdtemp's is 0700)
        with WorkdirLock(twin):  # no run writes the twin while it is copied
            if not is_twin(twin, cfg):
                return None
            for name in RUN_FILES:
                src = twin / name
                if src.is_dir():
                    shutil.copytree(src, tmp / name)
                elif src.is_file():
                    shutil.copy2(src, tmp / name)
        record = {"source": str(twin.resolve()), "copied": time.strftime("%Y-%m-%d %H:%M:%S")}
        (tmp / REUSED_FROM).write_text(json.dumps(record) + "\n")
        os.rename(tmp, workdir)  # one compare.py per root: the name is still free
    except (WorkdirBusyError, OSError) as e:
        print(f"[compare] {cfg.name}: not copied from {twin} ({e}); training it", file=sys.stderr)
        return None
    finally:
        if tmp is not None and tmp.exists():  # the folder mkdtemp made for us, not renamed
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[compare] {cfg.name}: copied the finished run {twin}", file=sys.stderr, flush=True)
    return twin
