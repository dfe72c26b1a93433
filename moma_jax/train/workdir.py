"""A run's directory: the one place that names its files, checks which experiment and config it
belongs to before anything is written, and saves the resolved config with the run.

Layout (a stable on-disk format):
    config.json      the resolved config, written atomically when a run starts or resumes
    checkpoints/     Orbax step directories (see `train.checkpoint`)
    metrics.jsonl    one JSON object per logged step (see `train.metrics`)
    tensorboard/     TensorBoard event files
    init_from.json   an `--init-from` run's starting tokens and FLOPs
    reused_from.json the run a suite copied this one from (`train.reuse`)
    previous-runs/   earlier runs moved aside by `--restart`, one folder each, never deleted

A fresh run never starts over an earlier one: `prior_run` says what a start at step 0 would
overwrite, and the loop refuses it unless the user asked for `--restart` (`move_aside`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.overrides import from_dict, resume_conflicts, to_dict
from moma_jax.safe_io import refuse_symlink, write_atomic

PREVIOUS_RUNS = "previous-runs"
# What a run writes here, and so what `--restart` moves aside (nothing else is touched).
REUSED_FROM = "reused_from.json"
RUN_FILES = (
    *("config.json", "checkpoints", "metrics.jsonl", "tensorboard", "init_from.json"),
    REUSED_FROM,
)


@dataclasses.dataclass(frozen=True)
class Workdir:
    """A run directory; prints as its path. The source of an upcycled run is one too."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def read_config(self) -> ExperimentConfig | None:
        """The config saved by the run here, or None when no run has started here; a file that
        does not load is a ConfigError naming it (and the key, for a wrongly typed value)."""
        if not self.config_file.exists():
            return None
        try:
            saved = json.loads(self.config_file.read_text())
            if not isinstance(saved, dict):
                raise ConfigError("not a JSON object")
            return from_dict(ExperimentConfig, saved)
        except (OSError, ValueError, TypeError) as e:  # a directory, JSONDecodeError, ConfigError
            raise ConfigError(
                f"{self.config_file} does not load ({e}); restore it (every checkpoint also "
                "holds its config), or start again with --restart"
            ) from None

    def prior_run(self) -> list[str]:
        """What a run starting at step 0 here would overwrite: committed or set-aside
        checkpoints, and metrics of trained steps (a metrics.jsonl left by a run that failed
        before its first step holds none)."""
        from moma_jax.train.checkpoint import committed_steps, other_entries
        from moma_jax.train.metrics import logged_steps

        found = []
        if steps := committed_steps(self.checkpoints):
            found.append(f"checkpoints of steps {steps}")
        if others := other_entries(self.checkpoints):
            found.append(f"{', '.join(others)} in {self.checkpoints.name}/")
        if trained := [s for s in logged_steps(self.metrics_file) if s > 0]:
            found.append(f"metrics of steps {min(trained)}..{max(trained)}")
        return found

    def move_aside(self) -> Path | None:
        """`--restart`: moves the run files here (RUN_FILES) into `previous-runs/TIME/`;
        returns that folder (None when there was nothing to move). Deletes nothing."""
        present = [self.path / name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return None
        target = self.path / PREVIOUS_RUNS / time.strftime("%Y%m%d-%H%M%S")
        n = 1
        while target.exists():
            target, n = target.with_name(f"{target.name.split('.')[0]}.{n}"), n + 1
        target.mkdir(parents=True)
        for path in present:
            path.rename(target / path.name)
        return target

    def check(self, cfg: ExperimentConfig, restart: bool = False) -> None:
        """Refuses a path under a file, a symlinked config.json or metrics.jsonl, or a workdir
        holding another experiment or config (unless `restart`: that run is moved aside).

        Reads only: a refused run leaves no trace.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"workdir {path} exists and is not a directory; choose another path")
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                raise ConfigError(
                    f"workdir {path} lies under the file {parent}; choose another path"
                )
        for file in (self.config_file, self.metrics_file):
            refuse_symlink(file)
        if restart:
            return
        saved = self.read_config()
        if saved is None:
            return
        if saved.name != cfg.name:
            raise ConfigError(
                f"workdir {path} holds a run of experiment {saved.name!r}, not {cfg.name!r}; "
                "use another --workdir (or the same experiment to resume, or --restart to move "
                "that run aside)"
            )
        conflicts = resume_conflicts(saved, cfg)
        if conflicts:
            raise ConfigError(
                f"workdir {path} was started with a different config; resuming would change "
                "the run:\n  "
                + "\n  ".join(conflicts)
                + "\nuse the original --set values, a new --workdir, or --restart (moves the "
                "earlier run aside into previous-runs/)"
            )
        if saved.run.init_from != cfg.run.init_from:  # resume-safe: read only at a start
            print(
                f"note: run.init_from {cfg.run.init_from!r} differs from this run's "
                f"{saved.run.init_from!r}; a resumed run continues from its own checkpoints "
                f"(init_from.json in {path} records the run it started from)",
                file=sys.stderr,
            )

    def write_config(self, cfg: ExperimentConfig) -> None:
        """Creates the workdir and saves the resolved config atomically (temp file, rename), so
        a killed process never leaves a half-written config that would refuse the resume."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_file, json.dumps(to_dict(cfg), indent=2))
