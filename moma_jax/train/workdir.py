"""A run's directory: the one place that names its files, checks which experiment and config it
belongs to before anything is written, and saves the resolved config with the run.

Layout (a stable on-disk format):
    config.json      the resolved config, written atomically when a run starts or resumes
    checkpoints/     Orbax step directories (see `train.checkpoint`)
    metrics.jsonl    one JSON object per logged step (see `train.metrics`)
    tensorboard/     TensorBoard event files
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.overrides import from_dict, resume_conflicts, to_dict


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
        """The config saved by the run here, or None when no run has started here."""
        if not self.config_file.exists():
            return None
        return from_dict(ExperimentConfig, json.loads(self.config_file.read_text()))

    def check(self, cfg: ExperimentConfig) -> None:
        """Refuses a path under a file, or a workdir holding another experiment or config.

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
        saved = self.read_config()
        if saved is None:
            return
        if saved.name != cfg.name:
            raise ConfigError(
                f"workdir {path} holds a run of experiment {saved.name!r}, not {cfg.name!r}; "
                "use another --workdir (or the same experiment to resume)"
            )
        conflicts = resume_conflicts(saved, cfg)
        if conflicts:
            raise ConfigError(
                f"workdir {path} was started with a different config; resuming would change "
                "the run:\n  "
                + "\n  ".join(conflicts)
                + "\nuse the original --set values, or a new --workdir"
            )

    def write_config(self, cfg: ExperimentConfig) -> None:
        """Creates the workdir and saves the resolved config atomically (temp file, rename), so
        a killed process never leaves a half-written config that would refuse the resume."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(to_dict(cfg), indent=2))
        tmp.replace(self.config_file)
