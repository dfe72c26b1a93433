"""`scripts/compare.py`: train a named suite (what is missing; a killed suite resumes where it
stopped), then report it at equal FLOPs.

    python scripts/compare.py --suite paper_tiny [--seeds N] [--root DIR] [--set key=value ...]
    python scripts/compare.py --suite paper_tiny --report-only

Runs live in ROOT/SUITE/EXPERIMENT/seedS (default ROOT: runs/suites). The report goes to
ROOT/SUITE/report.md, report.json and PNG plots (docs/comparison.md explains every number).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from moma_jax import host_memory
from moma_jax.commands.compare_plots import plots
from moma_jax.commands.compare_report import markdown, report, run_dir
from moma_jax.config import ConfigError
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


def seed_keys(seed: int) -> list[str]:
    return [f"run.param_seed={seed}", f"run.routing_seed={seed}", f"data.seed={seed}"]


def train_suite(suite: Suite, seeds: int, root: Path, overrides: list[str]) -> None:
    """Trains every (experiment, seed) of the suite to its schedule's end; finished runs are
    skipped and partial ones resume from their checkpoints."""
    from moma_jax.train import train

    for seed in range(seeds):
        for exp in suite.experiments:
            keys = [*suite.overrides, *overrides, *seed_keys(seed)]
            cfg = experiment_config(exp, keys)
            workdir = run_dir(root, suite, exp, seed)
            print(f"[compare] {exp} seed {seed} -> {workdir}", file=sys.stderr, flush=True)
            train(cfg, workdir)
            if (
                suite.aux_stages
                and needs_aux_routers(cfg.model)
                and cfg.model.aux_routers == "none"
            ):
                # The post-hoc aux-router stage, for causal losses (docs/sparsity.md).
                stage = stage_name(exp)
                stage_cfg = experiment_config(stage, [*keys, f"run.init_from={workdir.absolute()}"])
                stage_dir = run_dir(root, suite, stage, seed)
                print(f"[compare] {stage} seed {seed} -> {stage_dir}", file=sys.stderr, flush=True)
                train(stage_cfg, stage_dir)


def write_report(suite: Suite, seeds: int, root: Path) -> dict[str, Any]:
    rep = report(suite, seeds, root)
    out_dir = root / suite.name
    write_atomic(out_dir / "report.json", json.dumps(rep, indent=1) + "\n")
    write_atomic(out_dir / "report.md", markdown(rep))
    rep["plots"] = [str(p) for p in plots(rep, out_dir, seeds)]
    return rep


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__)
    p.add_argument("--suite", required=True, help="a named suite (experiments/suites.py)")
    p.add_argument("--seeds", type=int, help="seeds per experiment (default: the suite's)")
    p.add_argument("--root", default=os.path.join("runs", "suites"), help="where runs live")
    p.add_argument("--report-only", action="store_true", help="report the runs as they are")
    add_set_arg(p, "change every run of the suite (e.g. optim.total_steps=100)")
    add_experiments_module_arg(p)
    args = p.parse_args(argv)
    try:
        load_experiment_modules(args)
        suite = get_suite(args.suite)
        seeds = args.seeds or suite.seeds
        root = Path(args.root)
        # One compare.py per --root: two would train the same runs and write one report.
        with WorkdirLock(root, flag="--root"):
            if not args.report_only:
                enable_compilation_cache()
                train_suite(suite, seeds, root, list(args.overrides))
            rep = write_report(suite, seeds, root)
    except (ConfigError, ValueError, FileNotFoundError, WorkdirBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(rep))
    print(f"report: {root / suite.name / 'report.md'}; plots: {', '.join(rep['plots'])}")
    return 0
