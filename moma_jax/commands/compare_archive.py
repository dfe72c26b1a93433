"""`compare.py --archive DIR`: a suite's finished run (with its aux stage) archived after it
trains (`train.archive`: config, metrics, held-out score, no checkpoint), and a run the archive
holds, for this suite or another with the config and data this suite gives it, read from there
instead of trained again."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from moma_jax import data as data_lib
from moma_jax.commands.compare_report import score
from moma_jax.commands.compare_runs import run_dir, source_dir
from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.runtime import with_data_shares
from moma_jax.suites import Suite
from moma_jax.train.archive import (
    archive_run,
    copy_archived,
    differences,
    is_archived,
    open_archived,
)


def stands_for(there: Path, cfg: ExperimentConfig, manifest: dict[str, Any]) -> list[str]:
    """What keeps the archived run in `there` from standing for the run `cfg` would train on the
    data of `manifest` (`train.archive.differences`; `cfg` resolved as training resolves it):
    empty when it may. ValueError for a folder that is not a readable archived run."""
    return differences(open_archived(there), with_data_shares(cfg, manifest), manifest)


def archived_unit(
    archive: Path, root: Path, suite: Suite, seed: int, runs: list[tuple[str, ExperimentConfig]]
) -> bool:
    """Whether the suite's run `runs[0]` (with its aux stage, `runs[1]`, if any) is read from
    the archive instead of trained: `root` has no folder for it and the archive holds it, or
    holds it for another suite (copied into this suite's folder when the run and its stage
    have the config and data the suite gives them). A ConfigError names what differs when the
    suite's own archived run was trained with another config or data than the suite gives it
    now, or lacks its aux stage."""
    exp, cfg = runs[0]
    if run_dir(root, suite, exp, seed).exists():
        return False
    manifest = data_lib.load_manifest(data_lib.ensure_data(cfg.data.path or None))
    if not is_archived(run_dir(archive, suite, exp, seed)):
        twin = archived_twin(archive, suite, seed, runs, manifest)
        if twin is None:
            return False
        for (name, _), src in reversed(list(zip(runs, twin, strict=True))):  # the stage first
            copy_archived(src, run_dir(archive, suite, name, seed))
        print(f"[compare] {exp} seed {seed}: copied from the archived {twin[0]}", file=sys.stderr)
    for name, c in runs:
        there = run_dir(archive, suite, name, seed)
        if not is_archived(there):
            raise ConfigError(
                f"{archive} holds {exp} seed {seed} but not its aux stage {there}: move "
                f"{run_dir(archive, suite, exp, seed)} out of the archive to train both here"
            )
        diff = stands_for(there, c, manifest)
        if diff:
            raise ConfigError(
                f"{there} was trained with another config or data than suite {suite.name} "
                f"gives it now ({'; '.join(diff)}): archive into another folder (--archive), "
                "or move it out of the archive to train it here"
            )
    return True


def archived_twin(
    archive: Path,
    suite: Suite,
    seed: int,
    runs: list[tuple[str, ExperimentConfig]],
    manifest: dict[str, Any],
) -> list[Path] | None:
    """Another suite's archived folders of `runs` (the run and its aux stage, archived together
    there), the first in name order whose config and data equal the ones given here."""
    exp = runs[0][0]
    ours = run_dir(archive, suite, exp, seed).absolute()
    for pattern in (f"*/{exp}/seed{seed}", f"*/*/{exp}/seed{seed}"):
        for candidate in sorted(archive.glob(pattern)):
            if candidate.absolute() == ours:
                continue
            base = candidate.parent.parent
            paths = [base / name / f"seed{seed}" for name, _ in runs]
            try:
                if all(
                    is_archived(path) and not stands_for(path, c, manifest)
                    for (_, c), path in zip(runs, paths, strict=True)
                ):
                    return paths
            except ValueError:  # an unreadable candidate is no twin
                continue
    return None


def archive_unit(
    archive: Path, root: Path, suite: Suite, seed: int, runs: list[tuple[str, ExperimentConfig]]
) -> None:
    """Archives the finished run `runs[0]` with its held-out score, and first its aux stage and,
    for an upcycled experiment, the source run it started from (its curve up to the upcycling
    point; no score): the experiment's record, archived last, marks the unit as archived."""
    exp = runs[0][0]
    if suite.upstream_of(exp) is not None:  # provenance: its failure must not block the unit
        there = run_dir(archive, suite, f"{exp}.source", seed)
        try:
            archive_run(source_dir(root, suite, exp, seed), there)
        except (ConfigError, ValueError) as e:
            print(f"[compare] {exp} seed {seed}: its source not archived ({e})", file=sys.stderr)
    for name, _ in runs[:0:-1]:
        archive_run(run_dir(root, suite, name, seed), run_dir(archive, suite, name, seed))
    dest = run_dir(archive, suite, exp, seed)
    done = archive_run(run_dir(root, suite, exp, seed), dest, score(root, suite, exp, seed))
    if done:
        print(f"[compare] {exp} seed {seed}: archived in {dest}", file=sys.stderr, flush=True)
