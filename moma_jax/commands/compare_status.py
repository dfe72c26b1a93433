"""`compare.py --status`: where each run of a suite stands, without training or reporting: archived,
finished or resumable at a checkpoint under --root, or still to train. For a suite trained over
several machines or sessions (a `--root` each, one `--archive`), it says what is left."""

from __future__ import annotations

from pathlib import Path

from moma_jax.analysis import load_run
from moma_jax.config import ExperimentConfig
from moma_jax.suites import Suite
from moma_jax.train.archive import is_archived


def state(root: Path, archive: Path | None, suite: Suite, name: str, seed: int, steps: int) -> str:
    """One run's state: "archived" (the archive holds it and --root has no folder for it: it
    will not be trained), "finished" (", archived" too where the archive holds it),
    "checkpoint K/N" (a resume continues from step K),
    "started, no checkpoint", or "to train"."""
    here = root / suite.name / name / f"seed{seed}"
    there = None if archive is None else archive / suite.name / name / f"seed{seed}"
    archived = there is not None and is_archived(there)
    if not here.is_dir():
        return "archived" if archived else "to train"
    try:
        done = load_run(here).steps
    except ValueError:
        return "started, no checkpoint"
    if not done:
        return "started, no checkpoint"
    if done[-1] >= steps:
        return "finished, archived" if archived else "finished"
    return f"checkpoint {done[-1]}/{steps}"


def status_lines(
    units: list[tuple[Suite, int, list[tuple[str, ExperimentConfig]]]],
    root: Path,
    archive: Path | None,
) -> list[str]:
    """A table of every run of `units` ((suite part, seed, its runs)) and a count of what is
    left."""
    lines = ["| suite | seed | run | steps | state |", "|---|---|---|---|---|"]
    left = 0
    for part, seed, runs in units:
        for name, cfg in runs:
            steps = cfg.optim.total_steps
            where = state(root, archive, part, name, seed, steps)
            left += not where.startswith(("archived", "finished"))
            lines.append(f"| {part.name} | {seed} | {name} | {steps} | {where} |")
    total = sum(len(runs) for _, _, runs in units)
    lines += ["", f"{total - left} of {total} runs archived or finished; {left} left to train."]
    return lines
