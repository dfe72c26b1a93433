"""The benchmark instrument: sparse vs dense step time, matmul fraction, expert scaling, pipeline.

`python scripts/bench.py [--quick] [--set key=value ...]` prints one JSON object on stdout and a
table on stderr. Method, all in ONE process on ONE device:

1. Build every configuration at one benchmark shape (`BENCH_SHAPE`, from the `*_tiny`
   experiments): the dense model, the sparse architectures of the same layers and width (same
   ideal FLOPs per token), and `moe_{E}x` (one mixed group of E expert-choice experts, c = 1)
   for the expert-scaling sweep. Each routing group is the whole batch.
2. Take one real batch from the Grain pipeline; every configuration trains on that same batch.
3. Compile every train step ahead of time (jitted as `train/loop.py` does: in/out shardings,
   donated state); compile time is reported, never timed as a step.
4. Warm up, then interleave: in each round every timed function (each train step, the large
   reference matmul, each FFN forward+backward) runs once, the round's order rotated by one, so
   machine drift and order effects fall equally on every configuration.
5. Report medians and ratios computed within this one run; the Grain pipeline is timed alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moma_jax import data as data_lib
from moma_jax import registry
from moma_jax.config import ExperimentConfig, ModelConfig, validate
from moma_jax.describe import resolve_shares
from moma_jax.flops import LAYER_FLOPS, attention_flops_per_token, train_flops_per_token
from moma_jax.model.layers import SwiGLU
from moma_jax.model.moe import SparseFFN
from moma_jax.overrides import apply_overrides
from moma_jax.sharding import batch_sharding, make_mesh, replicated
from moma_jax.train.state import init_state, make_optimizer
from moma_jax.train.step import make_train_step

# One dense step takes ~0.8 s on a 2-core CPU at this shape (1,024 tokens per step).
BENCH_SHAPE = (
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "data.seq_len=256",
    "data.batch_size=4",
)
SPARSE_ARCHS = ("moe_8x", "moma_1t1i", "moma_4t4i", "mot")
DENSE = "dense"
MATMUL = "matmul"
# Dense bf16 tensor-core peaks (no sparsity) by device-kind substring, most specific first.
GPU_PEAK_BF16 = (
    ("H100 PCIe", 756e12, "H100 PCIe bf16 dense 756 TFLOP/s"),
    ("H100", 989e12, "H100 SXM bf16 dense 989 TFLOP/s"),
    ("H200", 989e12, "H200 bf16 dense 989 TFLOP/s"),
    ("A100", 312e12, "A100 bf16 dense 312 TFLOP/s"),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much to measure: rounds after warm-up, expert counts, pipeline batches."""

    rounds: int
    warmup: int
    experts: tuple[int, ...]
    pipeline_batches: int


FULL = Plan(rounds=15, warmup=2, experts=(4, 8, 16, 32, 64), pipeline_batches=200)
QUICK = Plan(rounds=5, warmup=1, experts=(4, 16, 64), pipeline_batches=50)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- Configurations --------------------------------------------------------------------------


def bench_config(arch: str, overrides: tuple[str, ...] = ()) -> ExperimentConfig:
    """`{arch}_tiny` at the benchmark shape; routing groups hold the whole batch (as the tiny
    experiments do) unless an override names `model.moe.routing_group_tokens`."""
    cfg = apply_overrides(registry.get(f"{arch}_tiny"), [*BENCH_SHAPE, *overrides])
    if not any(o.startswith("model.moe.routing_group_tokens") for o in overrides):
        moe = dataclasses.replace(
            cfg.model.moe, routing_group_tokens=cfg.data.batch_size * cfg.data.seq_len
        )
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))
    return validate(resolve_shares(cfg))


def expert_config(n_experts: int, overrides: tuple[str, ...] = ()) -> ExperimentConfig:
    """moe_8x with one mixed group of `n_experts` experts: capacity 1 fixes the active FLOPs."""
    cfg = bench_config("moe_8x", overrides)
    moe = dataclasses.replace(
        cfg.model.moe, group_experts=(n_experts,), modality_group=(0, 0), capacity=1.0
    )
    return validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe)))


def expert_name(n_experts: int) -> str:
    return f"moe_{n_experts}x"


def step_configs(plan: Plan, overrides: tuple[str, ...]) -> dict[str, ExperimentConfig]:
    """Every train step to time: dense, the sparse architectures, the expert sweep (deduplicated:
    moe_8x is the sweep's E = 8)."""
    configs = {arch: bench_config(arch, overrides) for arch in (DENSE, *SPARSE_ARCHS)}
    for e in plan.experts:
        cfg = expert_config(e, overrides)
        if cfg not in configs.values():
            configs[expert_name(e)] = cfg
    return configs


def default_overrides() -> tuple[str, ...]:
    """bf16 matmuls on GPU (MFU is quoted against the bf16 peak); f32 on CPU."""
    return ("model.compute_dtype=bfloat16",) if jax.default_backend() == "gpu" else ()


# --- Timed functions -------------------------------------------------------------------------


def time_call(fn: Callable[[], Any]) -> float:
    """Seconds for one call, waiting for every output."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


class StepBench:
    """One configuration's train step, compiled ahead of time, with its own donated state."""

    def __init__(self, cfg: ExperimentConfig, batch_np: dict[str, np.ndarray]):
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        tx = make_optimizer(cfg.optim)
        graphdef, init_fn, abstract, shardings = init_state(cfg, tx, mesh)
        batch_sh = batch_sharding(mesh)
        step = jax.jit(
            make_train_step(graphdef, cfg, tx),
            in_shardings=(shardings, batch_sh),
            out_shardings=(shardings, replicated(mesh)),
            donate_argnums=0,
        )
        self.batch = {k: jax.device_put(v, batch_sh) for k, v in batch_np.items()}
        start = time.perf_counter()
        self.compiled = step.lower(abstract, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.state = init_fn()
        self.metrics: dict = {}

    def __call__(self) -> Any:
        self.state, self.metrics = self.compiled(self.state, self.batch)
        return self.state, self.metrics

    def memory_bytes(self) -> int | None:
        """XLA's estimate of the step's peak: arguments + outputs + temporaries - donated."""
        stats = self.compiled.memory_analysis()
        if stats is None:
            return None
        return int(
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        )


def matmul_fn(n: int, dtype: str) -> Callable[[], jax.Array]:
    """A jitted n x n @ n x n matmul (2 n^3 FLOPs): the in-process peak stand-in."""
    a_NxN = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b_NxN = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return lambda: mm(a_NxN, b_NxN)


def ffn_fn(model_cfg: ModelConfig, batch_np: dict[str, np.ndarray]) -> Callable[[], Any]:
    """Forward+backward of one feed-forward alone (sparse if the config has experts): the
    gradient of sum(outputs) w.r.t. its parameters and its input. No optimizer."""
    rngs = nnx.Rngs(params=0)
    sparse = "moe" in model_cfg.layer_pattern
    ffn = SparseFFN(model_cfg, rngs=rngs) if sparse else SwiGLU(model_cfg, rngs=rngs)
    graphdef, params = nnx.split(ffn)
    modality_BxL = jnp.asarray(batch_np["modality"])
    segment_ids_BxL = jnp.asarray(batch_np["segment_ids"])
    x_BxLxD = jax.random.normal(jax.random.key(2), (*modality_BxL.shape, model_cfg.d_model))

    def total(params, x_BxLxD, modality_BxL, segment_ids_BxL):
        ctx = {"modality": modality_BxL, "segment_ids": segment_ids_BxL}
        y_BxLxD, _ = nnx.merge(graphdef, params)(x_BxLxD, ctx)
        return jnp.sum(y_BxLxD.astype(jnp.float32))

    grad = jax.jit(jax.grad(total, argnums=(0, 1)))
    return lambda: grad(params, x_BxLxD, modality_BxL, segment_ids_BxL)


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list]:
    """Seconds per call of each function: `warmup` untimed rounds, then `rounds` rounds in which
    every function runs once, the order rotated by one each round."""
    names = list(fns)
    for r in range(warmup):
        for name in names:
            jax.block_until_ready(fns[name]())
        log(f"warm-up round {r + 1}/{warmup} done")
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        start = time.perf_counter()
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_call(fns[name]))
        log(f"round {r + 1}/{rounds}: {time.perf_counter() - start:.1f} s")
    return times


def pipeline_tokens_per_s(cfg: ExperimentConfig, n_batches: int) -> dict[str, float]:
    """Packed batches per second from a fresh train iterator (its first batch excluded)."""
    start = time.perf_counter()
    it = data_lib.make_train_iterator(
        data_lib.ensure_data(cfg.data.path or None),
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        seed=cfg.data.seed + 1,  # not the benchmark batch's stream
    )
    next(it)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    seconds = time.perf_counter() - start
    tokens = n_batches * cfg.data.batch_size * cfg.data.seq_len
    return {"tokens_per_s": tokens / seconds, "first_batch_s": first_s, "batches": n_batches}


# --- Analysis --------------------------------------------------------------------------------


def ffn_side_executed_over_ideal(cfg: ModelConfig, seq_len: int) -> float:
    """Per layer, (executed - attention) / (ideal - attention), attention at its ideal count: the
    FFN side's buffer and masked-compute overhead (MoT's includes its untied projections)."""
    attention = attention_flops_per_token(cfg, seq_len)
    ideal = sum(LAYER_FLOPS[k](cfg, seq_len, "causal")[0] for k in cfg.layer_pattern)
    executed = sum(LAYER_FLOPS[k](cfg, seq_len, "causal")[1] for k in cfg.layer_pattern)
    n = len(cfg.layer_pattern)
    return (executed - n * attention) / (ideal - n * attention)


def gpu_peak() -> tuple[float, str] | None:
    """The device's bf16 dense peak FLOP/s and where the number comes from; None off GPU."""
    if jax.default_backend() != "gpu":
        return None
    kind = jax.devices()[0].device_kind
    for key, peak, source in GPU_PEAK_BF16:
        if key in kind:
            return peak, source
    return None


def device_memory() -> dict[str, int] | None:
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def machine() -> dict[str, Any]:
    model = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
    }


def median(values: list[float]) -> float:
    return float(np.median(values))


def spread(values: list[float]) -> float:
    """Interquartile range over median: the timing noise of one configuration."""
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float((q3 - q1) / q2)


def summarize(
    configs: dict[str, ExperimentConfig],
    plan: Plan,
    times: dict[str, list[float]],
    matmul_n: int,
    pipeline: dict[str, float],
) -> dict[str, Any]:
    """The report: ratios within this run, with the targets each is judged against."""
    dense = configs[DENSE]
    seq, rows = dense.data.seq_len, dense.data.batch_size
    tokens = seq * rows
    step_s = {name: median(times[name]) for name in configs}
    flops = {name: train_flops_per_token(c.model, seq) * tokens for name, c in configs.items()}
    executed = {
        name: train_flops_per_token(c.model, seq, executed=True) * tokens
        for name, c in configs.items()
    }
    matmul_flops_s = 2 * matmul_n**3 / median(times[MATMUL])
    achieved = {name: flops[name] / step_s[name] for name in configs}
    ffn_s = {name: median(v) for name, v in times.items() if name.startswith("ffn/")}
    e0 = expert_name(plan.experts[0])
    sweep = {e: (expert_name(e) if expert_name(e) in configs else "moe_8x") for e in plan.experts}
    peak = gpu_peak()
    step_tokens_s = tokens / step_s[DENSE]
    return {
        "shape": {
            "d_model": dense.model.d_model,
            "n_layers": dense.model.n_layers,
            "n_heads": dense.model.n_heads,
            "ffn_hidden": dense.model.resolved_ffn_hidden,
            "vocab_size": dense.model.vocab_size,
            "seq_len": seq,
            "batch_size": rows,
            "tokens_per_step": tokens,
            "routing_group_tokens": configs["moe_8x"].model.moe.routing_group_tokens,
            "compute_dtype": dense.model.compute_dtype,
        },
        "rounds": plan.rounds,
        "warmup_rounds": plan.warmup,
        "step_time_s": step_s,
        "step_time_spread": {name: spread(times[name]) for name in configs},
        "step_time_ratio": {a: step_s[a] / step_s[DENSE] for a in SPARSE_ARCHS},
        "step_time_per_flop_ratio": {
            a: (step_s[a] / flops[a]) / (step_s[DENSE] / flops[DENSE]) for a in SPARSE_ARCHS
        },
        "ideal_flops_ratio": {a: flops[a] / flops[DENSE] for a in SPARSE_ARCHS},
        "executed_over_ideal": {name: executed[name] / flops[name] for name in configs},
        "ffn_side_executed_over_ideal": {
            name: ffn_side_executed_over_ideal(c.model, seq) for name, c in configs.items()
        },
        "matmul_n": matmul_n,
        "matmul_flops_per_s": matmul_flops_s,
        "model_flops_per_s": achieved,
        "matmul_fraction": achieved[DENSE] / matmul_flops_s,
        "model_matmul_fraction": {name: v / matmul_flops_s for name, v in achieved.items()},
        "mfu": {name: v / peak[0] for name, v in achieved.items()} if peak else None,
        "mfu_peak_flops_per_s": peak[0] if peak else None,
        "mfu_peak_source": peak[1] if peak else None,
        "ffn_time_s": ffn_s,
        "ffn_sparse_over_dense": {
            k: v / ffn_s[f"ffn/{DENSE}"] for k, v in ffn_s.items() if k != f"ffn/{DENSE}"
        },
        "expert_scaling": {str(e): ffn_s[f"ffn/{sweep[e]}"] / ffn_s[f"ffn/{e0}"] for e in sweep},
        "expert_scaling_step": {str(e): step_s[sweep[e]] / step_s[e0] for e in sweep},
        "expert_scaling_step_s": {str(e): step_s[sweep[e]] for e in sweep},
        "pipeline_tokens_per_s": pipeline["tokens_per_s"],
        "pipeline_first_batch_s": pipeline["first_batch_s"],
        "step_tokens_per_s": step_tokens_s,
        "pipeline_ratio": pipeline["tokens_per_s"] / step_tokens_s,
    }


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each benchmark target (the issue's; benchmarks, not tests) with its value and verdict."""
    last = list(report["expert_scaling"])[-1]
    checks = [(f"step_time_ratio/{a}", v, "<=", 1.10) for a, v in report["step_time_ratio"].items()]
    checks += [
        ("matmul_fraction", report["matmul_fraction"], ">=", 0.40),
        (f"expert_scaling/{last}", report["expert_scaling"][last], "<=", 1.25),
        ("pipeline_ratio", report["pipeline_ratio"], ">=", 10.0),
    ]
    return {
        name: {
            "value": value,
            "target": f"{op} {bound}",
            "met": bool(value <= bound if op == "<=" else value >= bound),
        }
        for name, value, op, bound in checks
    }


# --- The run ---------------------------------------------------------------------------------


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


def run(plan: Plan, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Builds, compiles and times everything; returns the report (see the module docstring)."""
    wall = time.perf_counter()
    configs = step_configs(plan, (*default_overrides(), *overrides))
    dense = configs[DENSE]
    batch_np = first_batch(dense)
    steps: dict[str, StepBench] = {}
    for name, cfg in configs.items():
        log(f"compiling the {name} train step")
        steps[name] = StepBench(cfg, batch_np)
    fns: dict[str, Callable[[], Any]] = dict(steps)
    matmul_n = 8192 if jax.default_backend() == "gpu" else 2048
    fns[MATMUL] = matmul_fn(matmul_n, dense.model.compute_dtype)
    for name, cfg in configs.items():
        if name == DENSE or "moe" in cfg.model.layer_pattern:
            fns[f"ffn/{name}"] = ffn_fn(cfg.model, batch_np)
    log(f"timing {len(fns)} functions: {', '.join(fns)}")
    times = interleave(fns, plan.rounds, plan.warmup)
    log(f"timing the Grain pipeline ({plan.pipeline_batches} batches)")
    pipeline = pipeline_tokens_per_s(dense, plan.pipeline_batches)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "batch": batch_mix(batch_np),
        **summarize(configs, plan, times, matmul_n, pipeline),
    }
    report["compile_s"] = {name: s.compile_s for name, s in steps.items()}
    report["final_loss"] = {name: float(s.metrics["loss"]) for name, s in steps.items()}
    report["memory"] = {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": device_memory(),
        "step_estimate_mib": {
            name: (b / 2**20 if (b := s.memory_bytes()) is not None else None)
            for name, s in steps.items()
        },
    }
    report["targets"] = targets(report)
    report["wall_s"] = time.perf_counter() - wall
    return report


# --- Output ----------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    s, lines = report["shape"], []
    lines.append(
        f"shape: {s['n_layers']} layers x d={s['d_model']}, {s['batch_size']} x {s['seq_len']} "
        f"tokens, {s['compute_dtype']}; {report['rounds']} interleaved rounds "
        f"({report['machine']['cpu_model']}, {report['machine']['backend']})"
    )
    lines.append(
        f"{'config':<11}{'step s':>8}{'spread':>8}{'/dense':>8}{'/flop':>8}{'exec/ideal':>11}"
        f"{'ffn-side':>9}{'matmul%':>9}"
    )
    for name, step_s in report["step_time_s"].items():
        ratio = report["step_time_ratio"].get(name)
        per_flop = report["step_time_per_flop_ratio"].get(name)
        lines.append(
            f"{name:<11}{step_s:>8.3f}{report['step_time_spread'][name]:>8.1%}"
            f"{_num(ratio):>8}{_num(per_flop):>8}{report['executed_over_ideal'][name]:>11.3f}"
            f"{report['ffn_side_executed_over_ideal'][name]:>9.3f}"
            f"{report['model_matmul_fraction'][name]:>9.1%}"
        )
    lines.append(f"matmul {report['matmul_n']}^3: {report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    if report["mfu"]:
        lines.append(f"MFU (dense): {report['mfu']['dense']:.1%} of {report['mfu_peak_source']}")
    lines.append("experts  ffn fwd+bwd (/E0)   whole step (/E0)")
    for e, ratio in report["expert_scaling"].items():
        step = report["expert_scaling_step"][e]
        lines.append(f"{e:>7}  {ratio:>17.3f}   {step:>16.3f}")
    lines.append(
        f"pipeline: {report['pipeline_tokens_per_s']:.0f} tokens/s vs step "
        f"{report['step_tokens_per_s']:.0f} tokens/s = {report['pipeline_ratio']:.1f}x"
    )
    lines.append(f"peak RSS {report['memory']['peak_rss_mib']:.0f} MiB")
    for name, t in report["targets"].items():
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"target {name:<28} {t['value']:>8.3f} {t['target']:<8} {verdict}")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark sparse vs dense step time, matmul fraction, expert scaling and "
        "the input pipeline. JSON on stdout, a table on stderr.",
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds and expert counts")
    p.add_argument("--rounds", type=int, help="timed rounds (default: 15, --quick 5)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change the benchmark shape of every config (e.g. model.d_model=512)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    report = run(plan, tuple(args.overrides))
    report["command"] = " ".join(["python scripts/bench.py", *argv])
    print(table(report), file=sys.stderr)
    print(json.dumps(report))
    return 0
