"""`scripts/train.py`: parse the command line, resolve the experiment, train. Importable as
`main(argv)` so tests and notebooks run it in-process."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from moma_jax import distributed, host_memory, registry
from moma_jax.config import ConfigError
from moma_jax.overrides import to_dict
from moma_jax.runtime import (
    add_experiment_args,
    enable_compilation_cache,
    experiment_config,
    load_experiment_modules,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a named moma_jax experiment. Rerunning on the same workdir resumes.",
    )
    add_experiment_args(p)
    distributed.add_args(p)
    p.add_argument("--workdir", help="run directory (default: runs/EXP)")
    p.add_argument("--steps", type=int, help="stop after this step (default: optim.total_steps)")
    p.add_argument(
        "--init-from",
        metavar="WORKDIR",
        help="start from another run's latest checkpoint (upcycling; sets run.init_from)",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start again in a workdir that holds a run: that run is moved into "
        "WORKDIR/previous-runs/ (never deleted)",
    )
    p.add_argument("--list", action="store_true", help="list experiments and exit")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    return p


def _print_list() -> int:
    """The experiment names; a closed pipe (`--list | head`) ends it quietly."""
    try:
        for name in registry.names():
            print(f"{name:24s} {registry.describe(name)}")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at devnull so that flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()  # before JAX starts its threads
    args = build_parser().parse_args(argv)
    from moma_jax.train import TrainingDivergedError, train
    from moma_jax.train.faults import DiskFullError, Preempted, WorkdirBusyError

    try:
        load_experiment_modules(args)
        if args.list:
            return _print_list()
        if not args.exp:
            print("error: --exp NAME is required (--list shows the names)", file=sys.stderr)
            return 2
        overrides = list(args.overrides)
        if args.init_from:
            overrides.append(f"run.init_from={Path(args.init_from).absolute()}")
        cfg = experiment_config(args.exp, overrides)
        print(json.dumps(to_dict(cfg), indent=2), flush=True)
        if args.print_config:
            return 0
        enable_compilation_cache()
        distributed.initialize(args)
        workdir = Path(args.workdir or Path("runs") / cfg.name)
        train(cfg, workdir, args.steps, restart=args.restart)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # Bad input (config, data directory, records) ends with its message, not a traceback;
        # MOMA_JAX_TRACEBACK=1 shows the traceback when debugging the framework itself.
        if os.environ.get("MOMA_JAX_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only workdir, or one the user may not write
        if not (isinstance(e, PermissionError) or e.errno == errno.EROFS):
            raise
        reason = "the file system is read-only" if e.errno == errno.EROFS else e.strerror
        where = e.filename or args.workdir or "the workdir"
        print(
            f"error: cannot write {where}: {reason}; choose a writable --workdir", file=sys.stderr
        )
        return 2
    except (TrainingDivergedError, WorkdirBusyError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(
            f"stopped: {e}; its checkpoint is committed in {workdir / 'checkpoints' / str(e.step)}."
            f" Resume with the same command (exit status {e.exit_code}).",
            file=sys.stderr,
            flush=True,
        )
        return e.exit_code
    return 0
