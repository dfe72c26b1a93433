"""`compare.py --status`: where each run of a suite stands, without training or reporting: archived,
to be copied from another suite's archived run, finished or resumable at a checkpoint under
--root, or still to train. For a suite trained over several machines or sessions (a `--root`
each, one `--archive`), it says what is left.

It reads folder names, configs and archive records (no checkpoint is opened, no training step
compiled), so it may run beside a training; the suite's data is prepared only where its runs'
steps need it (a suite trained to dense's FLOPs, an upcycled run's split: `budgets`), as
training would. Against the suite's data where it is prepared, it finds the archived runs
another suite holds with this suite's config (training copies them), and marks an archived run
whose config or data now differ from the suite's (training stops on it, naming the key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moma_jax import data as data_lib
from moma_jax.commands.compare_archive import archived_twin, stands_for
from moma_jax.commands.compare_runs import run_dir
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


def unit_states(
    root: Path, archive: Path | None, unit: Unit, manifest: dict[str, Any] | None
) -> list[tuple[str, int, str]]:
    """(run, steps, state) for each run of one (experiment, seed): the experiment's run decides
    whether the unit is read from the archive (--root has no folder for it and the archive
    holds it: "archived", its source and stage with it, or "copied from" another suite's
    archived run and stage with the same config and data); otherwise each run is what --root
    holds of it ("finished", and ", archived" where the archive holds it too), or "to train".
    `manifest`: the suite's data's, None where it is not prepared (then no config or data is
    compared: an archived run shows as "archived (not compared: ...)")."""
    suite, seed, exp, runs = unit
    steps = {name: cfg.optim.total_steps for name, cfg in runs}
    own = [(name, cfg) for name, cfg in runs if name != f"{exp}.source"]  # what is compared

    def archived(name: str) -> bool:
        return archive is not None and is_archived(run_dir(archive, suite, name, seed))

    if _here(root, suite, exp, seed, steps[exp]) is None and archive is not None:
        if archived(exp):
            return [(n, steps[n], _archived_state(archive, unit, n, manifest)) for n, _ in runs]
        twin = None if manifest is None else archived_twin(archive, suite, seed, own, manifest)
        if twin is not None:
            copied = {
                name: f"copied from {path.parent.parent.relative_to(archive)}"
                for (name, _), path in zip(own, twin, strict=True)
            }
            return [(n, steps[n], copied.get(n, "not needed: its unit is copied")) for n, _ in runs]
    fresh = "to train"
    if manifest is None and archive is not None:
        fresh = "to train (data not prepared: no copy looked for)"
    out = []
    for name, _ in runs:
        where = _here(root, suite, name, seed, steps[name]) or fresh
        if where == "finished" and archived(name):
            where = "finished, archived"
        out.append((name, steps[name], where))
    return out


def _archived_state(archive: Path, unit: Unit, name: str, manifest: dict[str, Any] | None) -> str:
    """How a run of an archived unit stands against what the suite gives it now."""
    suite, seed, exp, runs = unit
    there = run_dir(archive, suite, name, seed)
    if not is_archived(there):
        return "not needed: its unit is archived" if name == f"{exp}.source" else "missing"
    if name == f"{exp}.source":
        return "archived"  # provenance only: training does not compare it
    if manifest is None:
        return "archived (not compared: the suite's data is not prepared here)"
    cfg = dict(runs)[name]
    try:
        diff = stands_for(there, cfg, manifest)
    except ValueError as e:
        return f"unreadable: {e}"
    return f"archived, differs: {'; '.join(diff)}" if diff else "archived"


def status_lines(units: list[Unit], root: Path, archive: Path | None) -> list[str]:
    """A table of every run of `units` ((suite part, seed, experiment, its runs)) and a count
    of what is left."""
    lines = ["| suite | seed | run | steps | state |", "|---|---|---|---|---|"]
    left = total = wrong = unchecked = 0
    manifests: dict[str | None, dict[str, Any] | None] = {}
    for unit in units:
        path = unit[3][-1][1].data.path or None
        if path not in manifests:
            manifests[path] = data_lib.prepared_manifest(path)
        for name, steps, where in unit_states(root, archive, unit, manifests[path]):
            total += 1
            left += where.startswith(("to train", "checkpoint", "started"))
            wrong += where.startswith(("archived, differs", "missing", "unreadable"))
            unchecked += where.startswith("archived (not compared")
            lines.append(f"| {unit[0].name} | {unit[1]} | {name} | {steps} | {where} |")
    lines += [
        "",
        f"{total - left - wrong - unchecked} of {total} runs archived, copied, finished or not "
        f"needed; {left} left to train.",
    ]
    if unchecked:
        lines.append(
            f"{unchecked} archived runs not compared with the suite (its data is not prepared "
            "here): training prepares it and stops on any that differ."
        )
    if wrong:
        lines.append(
            f"{wrong} archived runs differ from what the suite gives them now, are missing "
            "beside their unit or cannot be read: training stops on them (move their units "
            "out of the archive, or archive elsewhere)."
        )
    return lines
