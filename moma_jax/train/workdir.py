"""A run's directory: which experiment and config it belongs to, checked before anything is
written, and the resolved config saved with the run."""

from __future__ import annotations

import json
from pathlib import Path

from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.overrides import from_dict, resume_conflicts, to_dict

CONFIG_FILE = "config.json"


def check_workdir(cfg: ExperimentConfig, workdir: Path) -> None:
    """Refuses a path under a file, or a workdir holding another experiment or config.

    Reads only: a refused run leaves no trace.
    """
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} exists and is not a directory; choose another path")
    for parent in workdir.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(
                f"workdir {workdir} lies under the file {parent}; choose another path"
            )
    saved_path = workdir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = from_dict(ExperimentConfig, json.loads(saved_path.read_text()))
    if saved.name != cfg.name:
        raise ConfigError(
            f"workdir {workdir} holds a run of experiment {saved.name!r}, not {cfg.name!r}; "
            "use another --workdir (or the same experiment to resume)"
        )
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise ConfigError(
            f"workdir {workdir} was started with a different config; resuming would change the "
            "run:\n  "
            + "\n  ".join(conflicts)
            + "\nuse the original --set values, or a new --workdir"
        )


def write_config(cfg: ExperimentConfig, workdir: Path) -> None:
    """Creates the workdir and saves the resolved config atomically."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2))
    tmp.replace(path)
