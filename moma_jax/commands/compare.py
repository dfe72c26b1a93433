"""`scripts/compare.py`: train a named suite (what is missing; a killed suite resumes where it
stopped), then report it at equal FLOPs.

    python scripts/compare.py --suite paper_tiny [--seeds N] [--root DIR] [--set key=value ...]
    python scripts/compare.py --suite paper_tiny --report-only
    python scripts/compare.py --suite tokens_per_param_64 --budget 20   # one budget only
    python scripts/compare.py --suite paper_tiny --archive results   # keep results, no checkpoints
    python scripts/compare.py --suite paper_tiny --archive results --root runs/b --seed 3
    python scripts/compare.py --suite paper_micro --archive results --status   # what is left

Runs live in ROOT/SUITE/EXPERIMENT/seedS (default ROOT: runs/suites). The report goes to
ROOT/SUITE/report.md, report.json and PNG plots (docs/comparison.md explains every number). A
suite with tokens-per-parameter budgets keeps each budget in ROOT/SUITE/tpp{B}/ with its own
report, and writes ROOT/SUITE/scaling.md (fits across budgets). With --archive DIR, each run's
results (config, metrics, held-out score; no checkpoints) are kept in DIR/SUITE/EXPERIMENT/seedS
once it finished (`train.archive`), runs archived there with the config and data the suite gives
them are not trained again, and the report reads from DIR what ROOT lacks: a suite's seeds can
be trained on different machines or days and reported together. --seed S trains that seed only
(repeatable; one process per --root, so seeds trained side by side need a root each) and
reports once every run of the suite is there; --experiment NAME likewise. --status lists every
run as archived (or differing from the suite now), to be copied from another suite's archive,
finished, at a checkpoint or to train, and trains and reports nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from moma_jax import budgets, host_memory
from moma_jax.commands.compare_archive import archive_unit, archived_unit
from moma_jax.commands.compare_markdown import markdown
from moma_jax.commands.compare_plots import plots
from moma_jax.commands.compare_report import report
from moma_jax.commands.compare_runs import (
    chosen_experiments,
    chosen_seeds,
    locate,
    open_run,
    run_dir,
    source_dir,
)
from moma_jax.commands.compare_scaling import write_scaling
from moma_jax.commands.compare_status import status_lines
from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.model.kinds import needs_aux_routers
from moma_jax.registry import stage_name
from moma_jax.runtime import (
    add_experiments_module_arg,
    add_set_arg,
    enable_compilation_cache,
    experiment_config,
    load_experiment_modules,
)
from moma_jax.safe_io import write_atomic
from moma_jax.suites import Suite, get_suite
from moma_jax.train.faults import WorkdirBusyError, WorkdirLock
from moma_jax.train.reuse import reuse


def seed_keys(seed: int) -> list[str]:
    return [f"run.param_seed={seed}", f"run.routing_seed={seed}", f"data.seed={seed}"]


def budget_suites(suite: Suite, overrides: list[str]) -> list[Suite]:
    """The suite itself, or one suite per tokens-per-parameter budget (steps from the dense
    model's parameters and the real tokens of its training stream, seed 0, for every seed)."""
    schedule = [
        k for k in overrides if k.split("=")[0] in ("optim.total_steps", "optim.warmup_steps")
    ]
    if schedule and (suite.tokens_per_param or suite.match_flops):
        raise ConfigError(
            f"--set {schedule[0]}: suite {suite.name} sets every run's steps from its budget "
            "(match_flops or tokens_per_param); change the budget in the suite instead"
        )
    if not suite.tokens_per_param:
        return [suite]
    dense = experiment_config(suite.experiments[0], [*suite.overrides, *overrides])
    return [
        suite.at_budget(
            b, budgets.schedule_keys(dense, budgets.steps_for_tokens_per_param(dense, b), True)
        )
        for b in suite.tokens_per_param
    ]


def chosen_budgets(suite: Suite, chosen: list[float] | None) -> list[float]:
    """The budgets `--budget` names (default: every budget of the suite), in the suite's order;
    ConfigError for a suite without budgets or a budget it does not have."""
    if not chosen:
        return list(suite.tokens_per_param)
    have = ", ".join(f"{b:g}" for b in suite.tokens_per_param) or "none"
    for b in chosen:
        if b not in suite.tokens_per_param:
            raise ConfigError(
                f"--budget {b:g}: suite {suite.name} has tokens-per-parameter budgets {have}"
            )
    return [b for b in suite.tokens_per_param if b in chosen]


def chosen_parts(suite: Suite, chosen: list[float], overrides: list[str]) -> list[Suite]:
    """The suite, or its parts at the budgets `--budget` chose (`budget_suites`)."""
    parts = budget_suites(suite, list(overrides))
    if not suite.tokens_per_param:
        return parts
    kept = zip(parts, suite.tokens_per_param, strict=True)
    return [part for part, b in kept if b in chosen]


def run_keys(suite: Suite, exp: str, seed: int, overrides: list[str]) -> list[str]:
    """The --set keys of one run; with `match_flops`, its steps for dense's total FLOPs; an
    upcycled experiment (`Suite.upstream`) trains to what its source run left of them."""
    keys = [*suite.overrides, *overrides, *seed_keys(seed)]
    up = suite.upstream_of(exp)
    if (suite.match_flops or up is not None) and exp != suite.experiments[0]:
        cfg = experiment_config(exp, keys)
        dense_flops = budgets.total_flops(experiment_config(suite.experiments[0], keys))
        if up is not None:
            dense_flops -= budgets.total_flops(
                experiment_config(up.source, source_keys(suite, exp, seed, overrides))
            )
        keys += budgets.schedule_keys(cfg, budgets.steps_for_flops(cfg, dense_flops))
    return keys


def source_keys(suite: Suite, exp: str, seed: int, overrides: list[str]) -> list[str]:
    """The --set keys of upcycled experiment `exp`'s source run: `fraction` of dense's total
    training FLOPs, with its own full schedule."""
    up = suite.upstream_of(exp)
    assert up is not None
    keys = [*suite.overrides, *overrides, *seed_keys(seed)]
    dense_flops = budgets.total_flops(experiment_config(suite.experiments[0], keys))
    cfg = experiment_config(up.source, keys)
    return keys + budgets.schedule_keys(
        cfg, budgets.steps_for_flops(cfg, up.fraction * dense_flops)
    )


def unit_runs(
    suite: Suite, exp: str, seed: int, overrides: list[str], root: Path
) -> list[tuple[str, ExperimentConfig]]:
    """One (experiment, seed) of the suite: the run and, where the suite has one, its post-hoc
    aux-router stage (for causal losses, docs/sparsity.md; its own schedule, started from the
    run's folder under `root`)."""
    cfg = experiment_config(exp, run_keys(suite, exp, seed, overrides))
    runs = [(exp, cfg)]
    if suite.aux_stages and needs_aux_routers(cfg.model) and cfg.model.aux_routers == "none":
        base = [*suite.overrides, *overrides, *seed_keys(seed)]
        stage_keys = [*base, f"run.init_from={run_dir(root, suite, exp, seed).absolute()}"]
        runs.append((stage_name(exp), experiment_config(stage_name(exp), stage_keys)))
    return runs


def status(
    parts: list[Suite],
    seeds: list[int],
    root: Path,
    archive: Path | None,
    overrides: list[str],
    experiments: list[str] | None = None,
) -> list[str]:
    """`--status`: every run of the suite's parts and seeds (of `experiments`, where given),
    with where it stands."""
    units = []
    for part in parts:
        for seed in seeds:
            for exp in part.experiments if experiments is None else experiments:
                runs = unit_runs(part, exp, seed, overrides, root)
                up = part.upstream_of(exp)
                if up is not None:
                    keys = source_keys(part, exp, seed, overrides)
                    runs.insert(0, (f"{exp}.source", experiment_config(up.source, keys)))
                units.append((part, seed, exp, runs))
    return status_lines(units, root, archive)


def train_suite(
    suite: Suite,
    seeds: int,
    root: Path,
    overrides: list[str],
    reuse_runs: bool = True,
    archive: Path | None = None,
    only: list[int] | None = None,
    experiments: list[str] | None = None,
) -> None:
    """Trains every (experiment, seed) of the suite to its schedule's end; finished runs are
    skipped, partial ones resume from their checkpoints, and with `reuse_runs` a run another
    suite under `root` finished with the same config is copied (`train.reuse`). With `archive`,
    each finished run (and its aux stage) is archived there, and one archived there already
    is not trained (`archived_unit`). `only`: these seeds, not every one; `experiments`: these
    experiments (each with its aux stage and source run), not every one."""
    from moma_jax import train as training

    def train(cfg: ExperimentConfig, workdir: Path) -> None:
        copied = reuse_runs and reuse(root, workdir, cfg) is not None
        try:
            training.train(cfg, workdir)  # a copy resumes at its last step: verified
        except ConfigError as e:  # a copy whose checkpoints do not restore: ours to remove
            if not copied:
                raise
            print(f"[compare] the copy {workdir} does not resume ({e}); training", file=sys.stderr)
            shutil.rmtree(workdir)
            training.train(cfg, workdir)

    for seed in range(seeds) if only is None else only:
        for exp in suite.experiments if experiments is None else experiments:
            keys = run_keys(suite, exp, seed, overrides)
            up = suite.upstream_of(exp)
            workdir = run_dir(root, suite, exp, seed)
            runs = unit_runs(suite, exp, seed, overrides, root)
            cfg = runs[0][1]
            if archive is not None and archived_unit(archive, root, suite, seed, runs):
                print(f"[compare] {exp} seed {seed}: archived, not trained", file=sys.stderr)
                continue
            if up is not None:  # its source run first, then upcycled from it
                source = source_dir(root, suite, exp, seed)
                print(f"[compare] {up.source} seed {seed} -> {source}", file=sys.stderr, flush=True)
                train(
                    experiment_config(up.source, source_keys(suite, exp, seed, overrides)), source
                )
                cfg = experiment_config(exp, [*keys, f"run.init_from={source.absolute()}"])
            print(f"[compare] {exp} seed {seed} -> {workdir}", file=sys.stderr, flush=True)
            train(cfg, workdir)
            for stage, stage_cfg in runs[1:]:
                stage_dir = run_dir(root, suite, stage, seed)
                print(f"[compare] {stage} seed {seed} -> {stage_dir}", file=sys.stderr, flush=True)
                train(stage_cfg, stage_dir)
            if archive is not None:
                archive_unit(archive, root, suite, seed, runs)


def write_report(
    suite: Suite, seeds: int, root: Path, archive: Path | None = None
) -> dict[str, Any]:
    rep = report(suite, seeds, root, archive)
    out_dir = root / suite.name
    out_dir.mkdir(parents=True, exist_ok=True)  # every run read from the archive: none yet
    write_atomic(out_dir / "report.json", json.dumps(rep, indent=1) + "\n")
    write_atomic(out_dir / "report.md", markdown(rep))
    rep["plots"] = [str(p) for p in plots(rep, out_dir, seeds)]
    return rep


def _check_finished(suite: Suite, seeds: int, root: Path, archive: Path | None) -> None:
    """ValueError naming the first run of the suite that has not reached its last step."""
    for seed in range(seeds):
        for exp in suite.experiments:
            run = open_run(locate(root, suite, exp, seed, archive))
            done = max((r["step"] for r in run.records), default=0)
            if done < run.config.optim.total_steps:
                raise ValueError(
                    f"{run.workdir} is at step {done} of {run.config.optim.total_steps}"
                )


def _reportable(
    suite: Suite,
    parts: list[Suite],
    budgets: list[float],
    seeds: int,
    root: Path,
    archive: Path | None,
) -> tuple[list[Suite], list[dict[str, Any]], list[float]]:
    """--report-only on a budget suite: the budgets whose runs can be reported (a suite still
    training has its largest budgets unfinished), each skipped one said on stderr; an error
    if none can."""
    kept: list[tuple[Suite, dict[str, Any], float]] = []
    for part, budget in zip(parts, budgets, strict=True):
        try:
            _check_finished(part, seeds, root, archive)  # a fit on half-trained runs misleads
            kept.append((part, write_report(part, seeds, root, archive), budget))
        except (ValueError, FileNotFoundError) as e:
            print(f"[compare] {part.name}: not reported ({e})", file=sys.stderr)
    if not kept:
        raise ValueError(f"suite {suite.name}: no budget has runs to report under {root}")
    return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]


def _all_there(parts: list[Suite], seeds: int, root: Path, archive: Path | None) -> bool:
    """Whether every run of every seed is finished under `root` or in `archive`; says which is
    not on stderr."""
    for part in parts:
        try:
            _check_finished(part, seeds, root, archive)
        except (ValueError, FileNotFoundError) as e:
            print(
                f"[compare] {part.name}: not reported until every seed is there ({e})",
                file=sys.stderr,
            )
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__)
    p.add_argument("--suite", required=True, help="a named suite (experiments/suites.py)")
    p.add_argument("--seeds", type=int, help="seeds per experiment (default: the suite's)")
    p.add_argument("--root", default=os.path.join("runs", "suites"), help="where runs live")
    p.add_argument("--report-only", action="store_true", help="report the runs as they are")
    p.add_argument(
        "--status",
        action="store_true",
        help="list every run of the suite (these --seed/--budget) as archived, copied from another "
        "suite's archive, finished, at a checkpoint or to train; trains and reports nothing",
    )
    p.add_argument(
        "--budget",
        type=float,
        action="append",
        metavar="B",
        help="a budget suite: train and report only tokens-per-parameter budget B (repeatable; "
        "the scaling report lists the others as missing)",
    )
    p.add_argument(
        "--no-reuse",
        action="store_true",
        help="train every run here, even one another suite under --root finished with the "
        "same experiment, seed and config (by default it is copied)",
    )
    p.add_argument(
        "--archive",
        metavar="DIR",
        help="keep each finished run's results (config, metrics, held-out score; no "
        "checkpoints) in DIR/SUITE/EXPERIMENT/seedS, do not train a run archived there with the "
        "same config and data, and report from DIR the runs --root lacks",
    )
    p.add_argument(
        "--seed",
        type=int,
        action="append",
        metavar="S",
        help="train seed S only (repeatable), then report if every run of the suite is there "
        "(under --root or in --archive): seeds trained side by side, each with its own --root",
    )
    p.add_argument(
        "--experiment",
        action="append",
        metavar="NAME",
        help="train this experiment of the suite only (repeatable; its aux stage and source run "
        "with it), then report if every run is there: a suite's units side by side",
    )
    add_set_arg(p, "change every run of the suite (e.g. optim.total_steps=100)")
    add_experiments_module_arg(p)
    args = p.parse_args(argv)
    try:
        load_experiment_modules(args)
        suite = get_suite(args.suite)
        seeds = args.seeds or suite.seeds
        root = Path(args.root)
        archive = Path(args.archive) if args.archive else None
        if archive is not None and archive.resolve() == root.resolve():
            raise ConfigError(f"--archive {archive} is --root: give the archive its own folder")
        only = chosen_seeds(args.seed, seeds, args.report_only)
        exps = chosen_experiments(suite, args.experiment, args.report_only)
        if args.status:  # read only, beside a compare.py training under the same --root
            parts = chosen_parts(suite, chosen_budgets(suite, args.budget), args.overrides)
            listed = list(range(seeds)) if only is None else only
            print("\n".join(status(parts, listed, root, archive, list(args.overrides), exps)))
            return 0
        # One compare.py per --root: two would train the same runs and write one report.
        with WorkdirLock(root, flag="--root"):
            chosen = chosen_budgets(suite, args.budget)
            parts = chosen_parts(suite, chosen, args.overrides)
            if not args.report_only:
                enable_compilation_cache()
                for part in parts:
                    overrides = list(args.overrides)
                    reuse_runs = not args.no_reuse
                    train_suite(part, seeds, root, overrides, reuse_runs, archive, only, exps)
            if (only or exps) and not _all_there(parts, seeds, root, archive):
                return 0
            if suite.tokens_per_param and args.report_only:
                parts, reps, budgets = _reportable(suite, parts, chosen, seeds, root, archive)
            else:
                reps = [write_report(part, seeds, root, archive) for part in parts]
                budgets = chosen
            extra = write_scaling(suite, reps, root, budgets) if suite.tokens_per_param else []
    except (ConfigError, ValueError, FileNotFoundError, WorkdirBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for part, rep in zip(parts, reps, strict=True):
        print(markdown(rep))
        print(f"report: {root / part.name / 'report.md'}; plots: {', '.join(rep['plots'])}")
    if extra:
        print(f"scaling: {', '.join(str(p) for p in extra)}")
    return 0
