"""The benchmark instrument: sparse vs dense step time, matmul fraction, expert scaling, pipeline.

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
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moma_jax import data as data_lib
from moma_jax import registry
from moma_jax.cli import enable_compilation_cache
from moma_jax.config import ExperimentConfig, ModelConfig, validate
from moma_jax.describe import resolve_shares
from moma_jax.flops import LAYER_FLOPS, attention_flops_per_token, train_flops_per_token
from moma_jax.model.layers import SwiGLU
from moma_jax.model.moe import SparseFFN
from moma_jax.overrides import apply_overrides
from moma_jax.sharding import batch_sharding, make_mesh
from moma_jax.train.state import init_state, make_optimizer
from moma_jax.train.step import jit_train_step

# One dense step takes ~1 s on the 2-core CPU at this shape: 2,048 tokens per step and per
# routing group (the tiny experiments route 4,096-token groups at d=128; the paper 4,096).
BENCH_SHAPE = (
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "data.seq_len=256",
    "data.batch_size=8",
)
DENSE = "dense"
SPARSE_ARCHS = ("moe_8x", "moma_1t1i", "moma_4t4i", "mot")
FFN_ARCHS = (DENSE, "moe_8x", "moma_1t1i", "moma_4t4i")  # MoT's FFN is not a separate module
MATMUL = "matmul"
FFN_CALLS = 5  # a feed-forward alone takes ~50 ms: time blocks of calls, report per call
# Dense bf16 tensor-core peaks (no sparsity) by device-kind substring, most specific first.
GPU_PEAK_BF16 = (
    ("H100 PCIe", 756e12, "H100 PCIe bf16 dense 756 TFLOP/s"),
    ("H100", 989e12, "H100 SXM bf16 dense 989 TFLOP/s"),
    ("H200", 989e12, "H200 bf16 dense 989 TFLOP/s"),
    ("A100", 312e12, "A100 bf16 dense 312 TFLOP/s"),
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


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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


def expert_name(n_experts: int) -> str:
    return f"moe_{n_experts}x"


def default_overrides() -> tuple[str, ...]:
    """bf16 matmuls on GPU (MFU is quoted against the bf16 peak); f32 on CPU."""
    return ("model.compute_dtype=bfloat16",) if jax.default_backend() == "gpu" else ()


# --- Timed functions -------------------------------------------------------------------------


class Sample(NamedTuple):
    """One timed call: wall seconds, process CPU seconds (user + system), system seconds, and
    minor page faults (fresh memory touched for the first time)."""

    wall_s: float
    cpu_s: float
    sys_s: float
    faults: int


def measure(fn: Callable[[], Any]) -> Sample:
    """Times one call, waiting for every output; CPU time and faults from getrusage."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    jax.block_until_ready(fn())
    wall_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    user_s, sys_s = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return Sample(wall_s, user_s + sys_s, sys_s, after.ru_minflt - before.ru_minflt)


class StepBench:
    """One configuration's train step, compiled ahead of time, with its own donated state."""

    def __init__(self, cfg: ExperimentConfig, batch_np: dict[str, np.ndarray]):
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        tx = make_optimizer(cfg.optim)
        graphdef, init_fn, abstract, shardings = init_state(cfg, tx, mesh)
        batch_sh = batch_sharding(mesh)
        step = jit_train_step(graphdef, cfg, tx, shardings, batch_sh, mesh)
        self.batch = {k: jax.device_put(v, batch_sh) for k, v in batch_np.items()}
        start = time.perf_counter()
        self.compiled = step.lower(abstract, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        # Only the initial values matter here: with light LLVM optimisation the init compiles in
        # ~2.5 s instead of ~12 s per configuration on the 2-core CPU, and runs as fast.
        init = init_fn.lower().compile(compiler_options={"xla_backend_optimization_level": 1})
        self.state = init()
        self.metrics: dict = {}

    def __call__(self) -> Any:
        self.state, self.metrics = self.compiled(self.state, self.batch)
        return self.state, self.metrics

    def memory_mib(self) -> float | None:
        """XLA's estimate of the step's peak: arguments + outputs + temporaries - donated."""
        m = self.compiled.memory_analysis()
        if m is None:
            return None
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        return (total - m.alias_size_in_bytes) / 2**20


def build_steps(
    configs: dict[str, ExperimentConfig], batch_np: dict[str, np.ndarray]
) -> dict[str, StepBench]:
    steps = {}
    for name, cfg in configs.items():
        log(f"compiling the {name} train step")
        steps[name] = StepBench(cfg, batch_np)
    return steps


def matmul_fn(n: int, dtype: str) -> Callable[[], jax.Array]:
    """A jitted n x n @ n x n matmul (2 n^3 FLOPs): the in-process peak stand-in."""
    a_NxN = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b_NxN = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return lambda: mm(a_NxN, b_NxN)


def ffn_fn(model_cfg: ModelConfig, batch_np: dict[str, np.ndarray]) -> Callable[[], Any]:
    """FFN_CALLS forward+backward passes of one feed-forward alone (SparseFFN if the config has
    experts, else SwiGLU): the gradient of sum(outputs) w.r.t. its parameters and its input."""
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
    return lambda: [grad(params, x_BxLxD, modality_BxL, segment_ids_BxL) for _ in range(FFN_CALLS)]


def interleave(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, seed: int = 0
) -> dict[str, list[Sample]]:
    """Samples of each function: `warmup` untimed rounds, then `rounds` rounds in which every
    function runs once, in a fresh random order each round."""
    names, rng = list(fns), np.random.default_rng(seed)
    for r in range(warmup):
        for name in names:
            jax.block_until_ready(fns[name]())
        log(f"warm-up round {r + 1}/{warmup} done")
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for r in range(rounds):
        start = time.perf_counter()
        for i in rng.permutation(len(names)):
            samples[names[i]].append(measure(fns[names[i]]))
        log(f"round {r + 1}/{rounds}: {time.perf_counter() - start:.1f} s")
    return samples


def pipeline_tokens_per_s(cfg: ExperimentConfig, n_batches: int) -> dict[str, float]:
    """Packed tokens per second from a fresh train iterator (its first batch excluded)."""
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
    return {"tokens_per_s": tokens / seconds, "first_batch_s": first_s}


# --- Analysis --------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return float(np.median(values))


def spread(values: list[float]) -> float:
    """Interquartile range over median: the timing noise of one function."""
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float((q3 - q1) / q2)


def diagnostics(samples: list[Sample], calls: int = 1) -> dict[str, float]:
    """Medians per call (a sample may time `calls` calls): CPU seconds, cores kept busy,
    system-time share, page faults."""
    return {
        "cpu_s": median([s.cpu_s for s in samples]) / calls,
        "cores_busy": median([s.cpu_s / s.wall_s for s in samples]),
        "sys_fraction": median([s.sys_s / max(s.cpu_s, 1e-9) for s in samples]),
        "page_faults": median([s.faults for s in samples]) / calls,
    }


def ffn_side_executed_over_ideal(cfg: ModelConfig, seq_len: int) -> float:
    """Per layer, (executed - attention) / (ideal - attention), attention at its ideal count: the
    FFN side's buffer and masked-compute overhead (MoT's includes its untied projections)."""
    attention = len(cfg.layer_pattern) * attention_flops_per_token(cfg, seq_len)
    ideal, executed = (
        sum(LAYER_FLOPS[k](cfg, seq_len, "causal")[i] for k in cfg.layer_pattern) for i in (0, 1)
    )
    return (executed - attention) / (ideal - attention)


def gpu_peak() -> tuple[float, str] | None:
    """The device's bf16 dense peak FLOP/s and where the number comes from; None off GPU."""
    if jax.default_backend() != "gpu":
        return None
    kind = jax.devices()[0].device_kind
    return next(((p, src) for key, p, src in GPU_PEAK_BF16 if key in kind), None)


def shape_of(cfg: ExperimentConfig) -> dict[str, Any]:
    m, d = cfg.model, cfg.data
    return {
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "n_heads": m.n_heads,
        "ffn_hidden": m.resolved_ffn_hidden,
        "vocab_size": m.vocab_size,
        "seq_len": d.seq_len,
        "batch_size": d.batch_size,
        "tokens_per_step": d.seq_len * d.batch_size,
        "routing_group_tokens": m.moe.routing_group_tokens,
        "compute_dtype": m.compute_dtype,
    }


def arch_report(
    configs: dict[str, ExperimentConfig], samples: dict[str, list[Sample]], matmul_n: int
) -> dict[str, Any]:
    """Phase 1: sparse/dense step-time ratios, FLOPs accounting, the matmul fraction, MFU."""
    seq = configs[DENSE].data.seq_len
    tokens = seq * configs[DENSE].data.batch_size
    times = {name: [s.wall_s for s in v] for name, v in samples.items()}
    step_s = {name: median(times[name]) for name in configs}
    flops = {n: train_flops_per_token(c.model, seq) * tokens for n, c in configs.items()}
    executed = {
        n: train_flops_per_token(c.model, seq, executed=True) * tokens for n, c in configs.items()
    }
    matmul_flops_s = 2 * matmul_n**3 / median(times[MATMUL])
    achieved = {name: flops[name] / step_s[name] for name in configs}
    peak = gpu_peak()
    return {
        "step_time_s": step_s,
        "step_time_spread": {name: spread(times[name]) for name in configs},
        "step_time_ratio": {a: step_s[a] / step_s[DENSE] for a in SPARSE_ARCHS},
        "step_time_per_flop_ratio": {
            a: (step_s[a] / flops[a]) / (step_s[DENSE] / flops[DENSE]) for a in SPARSE_ARCHS
        },
        "ideal_flops_ratio": {a: flops[a] / flops[DENSE] for a in SPARSE_ARCHS},
        "train_flops_per_step": flops,
        "executed_over_ideal": {name: executed[name] / flops[name] for name in configs},
        "ffn_side_executed_over_ideal": {
            name: ffn_side_executed_over_ideal(c.model, seq) for name, c in configs.items()
        },
        "matmul_n": matmul_n,
        "matmul_flops_per_s": matmul_flops_s,
        "matmul_flops_per_s_best": 2 * matmul_n**3 / min(times[MATMUL]),
        "model_flops_per_s": achieved,
        "matmul_fraction": achieved[DENSE] / matmul_flops_s,
        "model_matmul_fraction": {name: v / matmul_flops_s for name, v in achieved.items()},
        "mfu": {name: v / peak[0] for name, v in achieved.items()} if peak else None,
        "mfu_peak_flops_per_s": peak[0] if peak else None,
        "mfu_peak_source": peak[1] if peak else None,
        "diagnostics": {name: diagnostics(v) for name, v in samples.items()},
    }


def sweep_report(experts: tuple[int, ...], samples: dict[str, list[Sample]]) -> dict[str, Any]:
    """Phase 2: FFN forward+backward (per call) and whole-step time as the expert count grows."""
    t = {name: median([s.wall_s for s in v]) for name, v in samples.items()}
    ffn_s = {name[4:]: v / FFN_CALLS for name, v in t.items() if name.startswith("ffn/")}
    e0 = expert_name(experts[0])
    return {
        "ffn_time_s": ffn_s,
        "ffn_time_spread": {
            n[4:]: spread([s.wall_s for s in v]) for n, v in samples.items() if n[:4] == "ffn/"
        },
        "ffn_sparse_over_dense": {k: v / ffn_s[DENSE] for k, v in ffn_s.items() if k != DENSE},
        "expert_scaling": {str(e): ffn_s[expert_name(e)] / ffn_s[e0] for e in experts},
        "expert_scaling_step": {
            str(e): t[f"step/{expert_name(e)}"] / t[f"step/{e0}"] for e in experts
        },
        "expert_scaling_step_s": {str(e): t[f"step/{expert_name(e)}"] for e in experts},
        "sweep_diagnostics": {
            n: diagnostics(v, FFN_CALLS if n[:4] == "ffn/" else 1) for n, v in samples.items()
        },
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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
        "load_average_1m": os.getloadavg()[0],  # other processes share the cores
        "jax": jax.__version__,
        "env": {k: os.environ.get(k, "") for k in ("GLIBC_TUNABLES", "XLA_FLAGS")},
    }


def device_memory() -> dict[str, int] | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


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
    fns = {**steps, MATMUL: matmul_fn(matmul_n, archs[DENSE].model.compute_dtype)}
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
    fns = {f"step/{name}": s for name, s in steps.items()}
    fns.update({f"ffn/{name}": ffn_fn(m, batch_np) for name, m in ffn_models.items()})
    log(f"phase 2, {plan.rounds} rounds of: {', '.join(fns)}")
    samples = interleave(fns, plan.rounds, plan.warmup, seed=1)
    return sweep_report(plan.experts, samples), steps


def run(plan: Plan, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Builds, compiles and times everything; returns the report (see the module docstring)."""
    wall, load_start = time.perf_counter(), os.getloadavg()[0]
    overrides = (*default_overrides(), *overrides)
    archs = {arch: bench_config(arch, overrides) for arch in (DENSE, *SPARSE_ARCHS)}
    batch_np = first_batch(archs[DENSE])
    report, steps = phase_archs(archs, batch_np, plan)
    info, moe_8x, rss_phase1 = step_info(steps), steps["moe_8x"], peak_rss_mib()
    del steps  # phase 1's states are freed before the sweep's large ones are built
    sweep, steps = phase_sweep(archs, moe_8x, batch_np, plan, overrides)
    report.update(sweep)
    info.update(step_info(steps))
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


def table(report: dict[str, Any]) -> str:
    """The report as a readable table."""
    s, diag = report["shape"], report["diagnostics"]
    lines = [
        f"shape: {s['n_layers']} layers x d={s['d_model']}, {s['batch_size']} x {s['seq_len']} "
        f"tokens, {s['compute_dtype']}; {report['rounds']} interleaved rounds per phase "
        f"({report['machine']['cpu_model']}, {report['machine']['backend']})",
        f"{'config':<11}{'step s':>8}{'spread':>8}{'/dense':>8}{'/flop':>8}{'exec/ideal':>11}"
        f"{'ffn-side':>9}{'matmul%':>9}{'cores':>7}{'faults':>8}",
    ]
    for name, step_s in report["step_time_s"].items():
        lines.append(
            f"{name:<11}{step_s:>8.3f}{report['step_time_spread'][name]:>8.1%}"
            f"{_num(report['step_time_ratio'].get(name)):>8}"
            f"{_num(report['step_time_per_flop_ratio'].get(name)):>8}"
            f"{report['executed_over_ideal'][name]:>11.3f}"
            f"{report['ffn_side_executed_over_ideal'][name]:>9.3f}"
            f"{report['model_matmul_fraction'][name]:>9.1%}"
            f"{diag[name]['cores_busy']:>7.2f}{diag[name]['page_faults']:>8.0f}"
        )
    lines.append(
        f"matmul {report['matmul_n']}^3: {report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"(median; best {report['matmul_flops_per_s_best'] / 1e9:.1f})"
    )
    if report["mfu"]:
        lines.append(f"MFU (dense): {report['mfu'][DENSE]:.1%} of {report['mfu_peak_source']}")
    lines.append("experts   ffn fwd+bwd s (/E0)   whole step s (/E0)")
    for e, ratio in report["expert_scaling"].items():
        ffn_s = report["ffn_time_s"][expert_name(int(e))]
        step_s, step = report["expert_scaling_step_s"][e], report["expert_scaling_step"][e]
        lines.append(f"{e:>7}   {ffn_s:>8.4f} ({ratio:5.2f})    {step_s:>8.3f} ({step:5.2f})")
    lines.append(
        "ffn fwd+bwd / dense: "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["ffn_sparse_over_dense"].items())
    )
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
    p.add_argument("--rounds", type=int, help="timed rounds per phase (default 20, --quick 5)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change every config (e.g. model.d_model=512 for a larger benchmark shape)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    enable_compilation_cache()
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    report = run(plan, tuple(args.overrides))
    report["command"] = " ".join(["python scripts/bench.py", *argv])
    print(table(report), file=sys.stderr)
    print(json.dumps(report))
    return 0
