"""`compare.py --status`: where each run of a suite stands, without training or reporting: archived,
finished or resumable at a checkpoint under --root, or still to train. For a suite trained over
several machines or sessions (a `--root` each, one `--archive`), it says what is left.

It reads folder names and archive records only (no checkpoint is opened, no JAX backend
started), so it may run beside a training. It does not check that an archived run's config and
data still equal the suite's (training does, and stops naming the key), nor find runs another
suite's archive or root would give by copy: those show as "to train"."""

from __future__ import annotations

from pathlib import Path

from moma_jax.config import ExperimentConfig
from moma_jax.suites import Suite
from moma_jax.train.archive import checkpointed_steps, is_archived

Unit = tuple[Suite, int, str, list[tuple[str, ExperimentConfig]]]


def _here(root: Path, suite: Suite, name: str, seed: int, steps: int) -> str | None:
    """A run's state under --root: "finished", "checkpoint K/N" (a resume continues from step
    K), "started, no checkpoint", or None where --root has no folder for it."""
    here = root / suite.name / name / f"seed{seed}"
    if not here.is_dir():
        return None
    done = checkpointed_steps(here)
    if not done:
        return "started, no checkpoint"
    return "finished" if done[-1] >= steps else f"checkpoint {done[-1]}/{steps}"


def unit_states(root: Path, archive: Path | None, unit: Unit) -> list[tuple[str, int, str]]:
    """(run, steps, state) for each run of one (experiment, seed): the experiment's run decides
    whether the unit is read from the archive (--root has no folder for it and the archive
    holds it: "archived", its source and stage with it); otherwise each run is what --root
    holds of it ("finished", and ", archived" where the archive holds it too), or "to train"."""
    suite, seed, exp, runs = unit

    def archived(name: str) -> bool:
        return archive is not None and is_archived(archive / suite.name / name / f"seed{seed}")

    steps = {name: cfg.optim.total_steps for name, cfg in runs}
    main = _here(root, suite, exp, seed, steps[exp])
    if main is None and archived(exp):
        return [
            (n, steps[n], "archived" if archived(n) else "not needed: its unit is archived")
            for n, _ in runs
        ]
    out = []
    for name, _ in runs:
        where = _here(root, suite, name, seed, steps[name]) or "to train"
        if where == "finished" and archived(name):
            where = "finished, archived"
        out.append((name, steps[name], where))
    return out


def status_lines(units: list[Unit], root: Path, archive: Path | None) -> list[str]:
    """A table of every run of `units` ((suite part, seed, experiment, its runs)) and a count
    of what is left."""
    lines = ["| suite | seed | run | steps | state |", "|---|---|---|---|---|"]
    left = total = 0
    for unit in units:
        for name, steps, where in unit_states(root, archive, unit):
            total += 1
            left += where.startswith(("to train", "checkpoint", "started"))
            lines.append(f"| {unit[0].name} | {unit[1]} | {name} | {steps} | {where} |")
    lines += [
        "",
        f"{total - left} of {total} runs archived, finished or not needed; {left} left to train.",
    ]
    return lines
