"""A benchmark row per layer kind: each kind's `_tiny` experiment against `dense_tiny`.

    python scripts/bench_kinds.py [--rounds 10] [--warmup 2] [--kind moh ...]
        [--set model.mamba.scan=associative ...] > kinds.json

The `_tiny` experiments are registered FLOP-matched to `dense_tiny` at the tiny shape (d=128,
4 layers, 16 x 256 tokens; each experiment's docstring), and some are matched through a shape of
their own (MoH's 6 heads, SwitchHead's 2 heads, Mamba's expand 1.5) that the main benchmark's
one shape (`runner.BENCH_SHAPE`) would undo; so each is timed here at its registered shape. One
process, one device, one real batch, every train step compiled ahead of time, interleaved rounds
in a fresh random order (as `runner`). Prints one JSON object on stdout (the same numbers as the
main benchmark's phase 1: step time, ratios to dense, ideal and executed FLOPs) and a table on
stderr. On the 2-core CPU the tiny steps take 0.1-0.5 s, so ratios under ~1.1 are within the
machine's noise; `spread` says how much.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax

from moma_jax import host_memory, registry
from moma_jax.bench.measure import machine
from moma_jax.bench.report import DENSE, MATMUL, arch_report
from moma_jax.bench.runner import first_batch
from moma_jax.bench.timed import build_steps, interleave, log, matmul_fn
from moma_jax.config import ConfigError, ExperimentConfig, validate
from moma_jax.overrides import apply_overrides
from moma_jax.runtime import enable_compilation_cache, resolve_shares

# Every layer kind of the table, by the `_tiny` experiment that shows it (dense first).
KINDS = {
    DENSE: "dense_tiny",
    "moe": "moma_4t4i_tiny",
    "mot": "mot_tiny",
    "mod_moe": "mod_moma_4t4i_tiny",
    "moh": "moh_tiny",
    "switchhead": "switchhead_tiny",
    "motok": "mixture_of_tokens_tiny",
    "mamba": "mamba_tiny",
    "mom": "mom_tiny",
    "mamba_moe": "moe_mamba_tiny",
}


def configs(kinds: list[str], overrides: Sequence[str] = ()) -> dict[str, ExperimentConfig]:
    """Dense and the named kinds' experiments with `overrides` (KEY=VALUE, on every one),
    validated; a kind not in `KINDS` is an error."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"no benchmark experiment for kind(s) {unknown}; known: {list(KINDS)}")
    names = [DENSE, *(k for k in (kinds or KINDS) if k != DENSE)]
    return {
        k: validate(resolve_shares(apply_overrides(registry.get(KINDS[k]), overrides)))
        for k in names
    }


def run(
    kinds: list[str], rounds: int, warmup: int, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    archs = configs(kinds, overrides)
    shapes = {(c.data.seq_len, c.data.batch_size) for c in archs.values()}
    if len(shapes) != 1:
        raise ConfigError(f"the experiments' batches differ ({shapes}); one batch feeds them all")
    batch_np = first_batch(archs[DENSE])
    steps = build_steps(archs, batch_np)
    matmul_n = 2048
    fns: dict[str, Callable[[], Any]] = {**steps}
    fns[MATMUL] = matmul_fn(matmul_n, archs[DENSE].model.compute_dtype)
    log(f"{rounds} rounds of: {', '.join(fns)}")
    report = arch_report(archs, interleave(fns, rounds, warmup), matmul_n)
    report["experiments"] = {k: KINDS[k] for k in archs}
    report["compile_s"] = {k: s.compile_s for k, s in steps.items()}
    report["machine"] = machine()
    report["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return report


def table(report: dict[str, Any]) -> str:
    rows = [
        f"{'kind':<11} {'experiment':<24} {'step s':>7} {'/dense':>7} {'spread':>7} "
        f"{'FLOPs/dense':>11} {'exec/ideal':>10}"
    ]
    for kind, exp in report["experiments"].items():
        ratio = report["step_time_ratio"].get(kind, 1.0)
        flops = report["ideal_flops_ratio"].get(kind, 1.0)
        rows.append(
            f"{kind:<11} {exp:<24} {report['step_time_s'][kind]:>7.3f} {ratio:>7.2f} "
            f"{report['step_time_spread'][kind]:>7.2f} {flops:>11.3f} "
            f"{report['executed_over_ideal'][kind]:>10.3f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()  # before JAX starts its threads
    p = argparse.ArgumentParser(prog="bench_kinds.py", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument(
        "--kind",
        action="append",
        default=[],
        help=f"time only these kinds against dense (repeatable; default all: {list(KINDS)})",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every experiment timed (repeatable)",
    )
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    enable_compilation_cache()
    try:
        report = run(args.kind, args.rounds, args.warmup, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["command"] = " ".join(["python scripts/bench_kinds.py", *(argv or sys.argv[1:])])
    report["backend"] = jax.default_backend()
    print(table(report), file=sys.stderr)
    print(json.dumps(report))
    return 0
