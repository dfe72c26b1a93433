"""The benchmark runner: configurations, timed functions, the two phases, `run` and `main`.

`python scripts/bench.py [--quick] [--set key=value ...]` prints one JSON object on stdout and a
table on stderr (docs/benchmarks.md explains the numbers). Everything runs in ONE process on ONE
device, and every ratio is computed within the run:

1. Configurations at one benchmark shape (`BENCH_SHAPE`, from the `*_tiny` experiments): the
   dense model and the sparse architectures of the same layers and width (the same ideal FLOPs
   per token), and `moe_{E}x` (one mixed group of E expert-choice experts, capacity 1, so the
   active FLOPs stay fixed) for the expert sweep. A routing group is the whole batch.
2. One real batch from the Grain pipeline (real modality mix and padding) feeds every config.
3. Every train step is compiled ahead of time, jitted as `train/loop.py` does it (in/out
   shardings, donated state); compile time is reported, never timed as a step.
4. Two interleaved phases, each: warm-up rounds, then timed rounds in which every function runs
   once in a fresh random order, so machine drift and the after-effects of one function on the
   next (freed memory, caches) fall evenly on all. Phase 1: dense, the sparse architectures and a
   large matmul (the in-process peak stand-in). Phase 2: the expert sweep's train steps and the
   forward+backward of each feed-forward alone (no optimizer); the sweep's large states are built
   only after phase 1 is done, so they cannot disturb its numbers.
5. Medians and ratios; the Grain pipeline is timed alone at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from moma_jax import data as data_lib
from moma_jax import host_memory, registry
from moma_jax.bench import decode
from moma_jax.bench import experts as experts_bench
from moma_jax.bench.measure import (
    device_memory,
    machine,
    peak_rss_mib,
)
from moma_jax.bench.report import (
    DENSE,
    FFN_ARCHS,
    MATMUL,
    SPARSE_ARCHS,
    arch_report,
    expert_name,
    shape_of,
    sweep_report,
    table,
    targets,
)
from moma_jax.bench.timed import (
    StepBench,
    build_steps,
    ffn_fn,
    interleave,
    log,
    matmul_fn,
    pipeline_tokens_per_s,
)
from moma_jax.config import ConfigError, ExperimentConfig, validate
from moma_jax.overrides import apply_overrides
from moma_jax.runtime import (
    add_experiments_module_arg,
    add_set_arg,
    enable_compilation_cache,
    load_experiment_modules,
    resolve_shares,
)

# One dense step takes ~1 s on the 2-core CPU at this shape: 2,048 tokens per step and per
# routing group (the tiny experiments route 4,096-token groups at d=128; the paper 4,096).
BENCH_SHAPE = (
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "data.seq_len=256",
    "data.batch_size=8",
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to measure: rounds per phase after warm-up, expert counts, pipeline batches."""

    rounds: int
    warmup: int
    experts: tuple[int, ...]
    pipeline_batches: int


FULL = Plan(rounds=20, warmup=2, experts=(4, 8, 16, 32, 64), pipeline_batches=200)
QUICK = Plan(rounds=5, warmup=1, experts=(4, 16, 64), pipeline_batches=50)
DEVICE = Plan(rounds=10, warmup=2, experts=(4, 16, 32), pipeline_batches=50)  # 64: OOM on 80 GB

# `--device`: a shape that keeps an H100 busy (16,384 tokens per step, the paper's 4,096-token
# routing groups) while every model still compiles in seconds; bf16 matmuls (default_overrides).
DEVICE_SHAPE = (
    "model.d_model=1024",
    "model.n_heads=8",
    "data.seq_len=1024",
    "data.batch_size=16",
    "model.moe.routing_group_tokens=4096",
)


# --- Configurations --------------------------------------------------------------------------


def bench_config(arch: str, overrides: tuple[str, ...] = ()) -> ExperimentConfig:
    """`{arch}_tiny` at the benchmark shape; a routing group holds the whole batch (as in the
    tiny experiments) unless an override names `model.moe.routing_group_tokens`."""
    cfg = apply_overrides(registry.get(f"{arch}_tiny"), [*BENCH_SHAPE, *overrides])
    if not any(o.startswith("model.moe.routing_group_tokens") for o in overrides):
        tokens = cfg.data.batch_size * cfg.data.seq_len
        moe = dataclasses.replace(cfg.model.moe, routing_group_tokens=tokens)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))
    return validate(resolve_shares(cfg))


def expert_config(n_experts: int, overrides: tuple[str, ...] = ()) -> ExperimentConfig:
    """moe_8x with one mixed group of `n_experts` experts at capacity 1 (fixed active FLOPs:
    each expert's slots shrink as E grows)."""
    cfg = bench_config("moe_8x", overrides)
    moe = dataclasses.replace(
        cfg.model.moe, group_experts=(n_experts,), modality_group=(0, 0), capacity=1.0
    )
    return validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe)))


def default_overrides() -> tuple[str, ...]:
    """bf16 matmuls on GPU (MFU is quoted against the bf16 peak); f32 on CPU."""
    return ("model.compute_dtype=bfloat16",) if jax.default_backend() == "gpu" else ()


# --- Analysis --------------------------------------------------------------------------------


def first_batch(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """The first packed batch of the real training pipeline: real modality mix and padding."""
    it = data_lib.make_train_iterator(
        data_lib.ensure_data(cfg.data.path or None),
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        seed=cfg.data.seed,
    )
    return dict(next(it))


def batch_mix(batch_np: dict[str, np.ndarray]) -> dict[str, float]:
    real_BxL = batch_np["segment_ids"] > 0
    return {
        "image_share": float(np.mean(batch_np["modality"][real_BxL] == data_lib.IMAGE)),
        "padding_share": float(np.mean(~real_BxL)),
    }


def step_info(steps: dict[str, StepBench]) -> dict[str, dict[str, Any]]:
    """Compile seconds, last loss (a finite loss says the steps really trained) and memory."""
    return {
        name: {
            "compile_s": s.compile_s,
            "final_loss": float(s.metrics["loss"]),
            "memory_estimate_mib": s.memory_mib(),
        }
        for name, s in steps.items()
    }


def phase_archs(
    archs: dict[str, ExperimentConfig], batch_np: dict[str, np.ndarray], plan: Plan
) -> tuple[dict[str, Any], dict[str, StepBench]]:
    """Phase 1: dense, the sparse architectures and the reference matmul, interleaved."""
    steps = build_steps(archs, batch_np)
    matmul_n = 8192 if jax.default_backend() == "gpu" else 2048
    fns: dict[str, Callable[[], Any]] = {**steps}
    fns[MATMUL] = matmul_fn(matmul_n, archs[DENSE].model.compute_dtype)
    log(f"phase 1, {plan.rounds} rounds of: {', '.join(fns)}")
    return arch_report(archs, interleave(fns, plan.rounds, plan.warmup), matmul_n), steps


def phase_sweep(
    archs: dict[str, ExperimentConfig],
    moe_8x: StepBench,
    batch_np: dict[str, np.ndarray],
    plan: Plan,
    overrides: tuple[str, ...],
) -> tuple[dict[str, Any], dict[str, StepBench]]:
    """Phase 2: the expert sweep's train steps and every feed-forward alone, interleaved."""
    sweep = {expert_name(e): expert_config(e, overrides) for e in plan.experts}
    reuse = {name for name, cfg in sweep.items() if cfg == archs["moe_8x"]}  # E = 8
    steps = build_steps({n: c for n, c in sweep.items() if n not in reuse}, batch_np)
    steps.update({name: moe_8x for name in reuse})
    ffn_models = {name: archs[name].model for name in FFN_ARCHS}
    ffn_models.update({name: cfg.model for name, cfg in sweep.items()})
    fns: dict[str, Callable[[], Any]] = {f"step/{name}": s for name, s in steps.items()}
    fns.update({f"ffn/{name}": ffn_fn(m, batch_np) for name, m in ffn_models.items()})
    log(f"phase 2, {plan.rounds} rounds of: {', '.join(fns)}")
    samples = interleave(fns, plan.rounds, plan.warmup, seed=1)
    return sweep_report(plan.experts, samples), steps


def phase_decode(
    archs: dict[str, ExperimentConfig], batch_np: dict[str, np.ndarray], plan: Plan
) -> dict[str, Any]:
    """Phase 3: KV-cached generation per architecture at batch 1 and 8 (`bench/decode.py`)."""
    vocab = decode.vocab_of(archs[DENSE])  # every architecture trains on the same data
    fns = {
        f"{name}/b{rows}{suffix}": make(cfg, vocab, batch_np["tokens"], rows)
        for name, cfg in archs.items()
        for rows in decode.BATCHES
        for suffix, make in (("", decode.decode_fn), (decode.STEPS, decode.steps_fn))
    }
    log(f"phase 3, {plan.rounds} rounds of: {', '.join(fns)}")
    return decode.decode_report(interleave(fns, plan.rounds, plan.warmup, seed=2), DENSE)


def run(
    plan: Plan, overrides: tuple[str, ...] = (), extra_archs: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Builds, compiles and times everything; returns the report (see the module docstring)."""
    wall, load_start = time.perf_counter(), os.getloadavg()[0]
    overrides = (*default_overrides(), *overrides)
    names = (DENSE, *SPARSE_ARCHS, *(a for a in extra_archs if a not in SPARSE_ARCHS))
    archs = {arch: bench_config(arch, overrides) for arch in names}
    batch_np = first_batch(archs[DENSE])
    report, steps = phase_archs(archs, batch_np, plan)
    info, moe_8x, rss_phase1 = step_info(steps), steps["moe_8x"], peak_rss_mib()
    del steps  # phase 1's states are freed before the sweep's large ones are built
    sweep, steps = phase_sweep(archs, moe_8x, batch_np, plan, overrides)
    report.update(sweep)
    info.update(step_info(steps))
    del steps
    report["decode"] = phase_decode(archs, batch_np, plan)
    log(f"timing the Grain pipeline ({plan.pipeline_batches} batches)")
    pipeline = pipeline_tokens_per_s(archs[DENSE], plan.pipeline_batches)
    step_tokens_s = shape_of(archs[DENSE])["tokens_per_step"] / report["step_time_s"][DENSE]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_1m_start": load_start},
        "shape": shape_of(archs[DENSE]),
        "batch": batch_mix(batch_np),
        "rounds": plan.rounds,
        "warmup_rounds": plan.warmup,
        **report,
        "pipeline_tokens_per_s": pipeline["tokens_per_s"],
        "pipeline_first_batch_s": pipeline["first_batch_s"],
        "step_tokens_per_s": step_tokens_s,
        "pipeline_ratio": pipeline["tokens_per_s"] / step_tokens_s,
        "steps": info,
        "memory": {
            "peak_rss_mib_phase1": rss_phase1,
            "peak_rss_mib": peak_rss_mib(),
            "device": device_memory(),
        },
    }
    report["targets"] = targets(report)
    report["wall_s"] = time.perf_counter() - wall
    return report


# --- Output ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    host_memory.keep_freed_memory()  # before JAX starts its threads
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark sparse vs dense step time, matmul fraction, expert scaling and "
        "the input pipeline. JSON on stdout, a table on stderr.",
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds and expert counts")
    p.add_argument(
        "--device",
        action="store_true",
        help="the accelerator run: a larger shape (DEVICE_SHAPE), bf16, MFU, and the expert "
        "layer alone at the 1.4b shape (scripts/bench_experts.py); needs a GPU",
    )
    p.add_argument("--rounds", type=int, help="timed rounds per phase (default 20, --quick 5)")
    add_set_arg(p, "change every config (e.g. model.d_model=512 for a larger benchmark shape)")
    add_experiments_module_arg(p)
    p.add_argument(
        "--arch",
        action="append",
        default=[],
        metavar="ARCH",
        help="also time the experiment ARCH_tiny against dense (e.g. one registered by "
        "--experiments; repeatable)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    plan = DEVICE if args.device else QUICK if args.quick else FULL
    overrides = (*DEVICE_SHAPE, *args.overrides) if args.device else tuple(args.overrides)
    if args.device and jax.default_backend() != "gpu":
        print(
            f"error: --device needs a GPU; the JAX backend is {jax.default_backend()}",
            file=sys.stderr,
        )
        return 2
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    try:
        load_experiment_modules(args)
        for arch in args.arch:
            bench_config(arch, overrides)  # a bad name fails here, before any work
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    enable_compilation_cache()
    report = run(plan, overrides, tuple(args.arch))
    if args.device:
        log("the expert layer alone at the 1.4b shape (bench_experts)")
        report["expert_layer"] = experts_bench.run(experts_bench.GPU)
    report["command"] = " ".join(["python scripts/bench.py", *argv])
    print(table(report), file=sys.stderr)
    print(json.dumps(report))
    return 0
