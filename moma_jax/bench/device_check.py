"""The one-call device check: everything a lent GPU should measure, prepared on the CPU machine
and run there in one command.

On the CPU machine, from the repository root:

    python scripts/device_check.py prepare

builds `.device_check/` (git-ignored): wheels, for the device image's Python, of the packages
that image lacks (`DEVICE_WHEELS`), the bundled data prepared, and `run.sh`; it prints the one
device call to make (its `command`, `carry` and `timeout_s`). On the device `run.sh` installs the
wheels and runs, from the repository root,

    python3 scripts/device_check.py run --data .device_check/data --out $OUT

which measures, in this order, each phase started only while the budget (`--budget-s`, default
300) lasts, and rewrites `device_check.json` as each phase ends (a killed run keeps the phases
done; a phase that fails records its error and the next one runs):

  env        JAX, Flax and device versions, the bf16 peak, the backend's default settings
  attention  XLA / Pallas flash / cuDNN (mask as a bias) fwd+bwd, checked against XLA
  gemm       a dense GEMM against jax.lax.ragged_dot and Pallas's Mosaic-GPU ragged_dot
  experts    the expert layer alone at the 1.4b shape: slabs at first_fraction 0.75 / 1.0 / 0.5,
             ragged_dot, against the dense SwiGLU (bench/experts.py)
  variants   train steps that choose per-backend defaults: dense with model.attention xla /
             pallas, moe_8x and moma_4t4i at first_fraction 0.75 / 1.0 (interleaved)
  bench      `bench.py --device` with fewer rounds: dense MFU, sparse/dense steps, expert sweep,
             decoding tokens/s, the input pipeline (bench/runner.py)
  mamba_scan a mamba train step at the bench shape with each path of `model.mamba.scan`
             (associative, sequential) against dense: what `auto` should pick on this backend

`run --dry-run` runs every phase at tiny shapes on any backend (the Pallas kernel in its
interpreter): the CI test runs it, so the script is checked before device time is spent on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DIR = ".device_check"
# What the device image ('cuda', Python 3.12; /work/.library/device/KINDS.md) lacks of our
# stack: its JAX, Flax, Optax, Orbax and TensorStore serve as they are.
DEVICE_WHEELS = ("grain==0.2.18", "array_record==0.8.6", "portpicker==1.6.0")
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
MARKER = ".written-by-device-check"  # prepare refreshes only a directory holding it
TIMEOUT_S = 420  # the device call's limit: the 300 s budget, compiles of a last phase, margin
PHASES = ("env", "attention", "gemm", "experts", "variants", "bench", "mamba_scan")

RUN_SH = """#!/bin/bash
# The moma_jax device check (written by `python scripts/device_check.py prepare`).
# Run from the repository root on the device machine: bash {dir}/run.sh
set -u
out="${{OUT:-{dir}/out}}"
mkdir -p "$out"
if compgen -G "{dir}/whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
    --target /tmp/moma_site {dir}/whl/*.whl || {{ echo "wheel install failed" >&2; exit 3; }}
fi
export PYTHONPATH="/tmp/moma_site:$PWD" PYTHONUNBUFFERED=1
# Fail in seconds, not after the budget, if this image's stack cannot load the model.
python3 -c "import jax, flax, grain, moma_jax.model, moma_jax.data
print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \\
  || {{ echo "moma_jax does not import here" >&2; exit 4; }}
python3 scripts/device_check.py run --data {dir}/data --out "$out" 2>&1 | tee "$out/log.txt"
exit "${{PIPESTATUS[0]}}"
"""


# --- prepare (on the CPU machine) --------------------------------------------------------------


def download_wheels(dest: Path, specs: tuple[str, ...] = DEVICE_WHEELS) -> list[str]:
    """`pip download` of each spec as a binary wheel for the device's Python (no dependencies:
    the image has them); returns the wheel file names."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", DEVICE_PYTHON, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *specs], check=True)
    return sorted(p.name for p in dest.glob("*.whl"))


def prepare(root: Path, wheels: bool = True) -> dict[str, Any]:
    """Builds `root/DIR` (wheels, prepared data, run.sh) and returns the device call to make.
    Only this function's own directory is written; an existing one is refreshed in place."""
    from moma_jax import data as data_lib

    if not (root / "scripts" / "device_check.py").is_file():
        raise FileNotFoundError(
            f"{root} is not the moma_jax repository root (no scripts/device_check.py): the "
            "device runs the bundle from the repository's copy, so prepare it from the root"
        )
    bundle = root / DIR
    marker = bundle / MARKER
    if bundle.exists() and any(bundle.iterdir()) and not marker.is_file():
        raise FileExistsError(
            f"{bundle} exists and was not written by `device_check.py prepare` (no {MARKER}); "
            "move it away or remove it yourself, then prepare again"
        )
    bundle.mkdir(exist_ok=True)
    marker.write_text("written by python scripts/device_check.py prepare; safe to delete\n")
    data_src = data_lib.ensure_data(None)
    data_dst = bundle / "data"
    if data_dst.exists():
        shutil.rmtree(data_dst)  # our own copy from an earlier prepare
    shutil.copytree(data_src, data_dst)
    if (bundle / "whl").exists():
        shutil.rmtree(bundle / "whl")  # our own wheels from an earlier prepare: no stale versions
    names = download_wheels(bundle / "whl") if wheels else []
    (bundle / "run.sh").write_text(RUN_SH.format(dir=DIR))
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return {
        "command": f"bash {DIR}/run.sh",
        "carry": [DIR],
        "timeout_s": TIMEOUT_S,
        "wheels": names,
        "bundle_mib": round(size / 2**20, 1),
    }


# --- run (on the device) ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes and rounds of one check: DEVICE, or TINY for `--dry-run`."""

    attention: Any
    gemm: Any
    experts: Any
    bench_overrides: tuple[str, ...]
    bench_plan: Any
    variant_rounds: int
    first_fractions: tuple[float, ...] = (1.0, 0.5)


def sizes(dry_run: bool) -> Sizes:
    from moma_jax.bench import experts, kernels, runner

    if not dry_run:
        plan = dataclasses.replace(runner.DEVICE, rounds=5, warmup=1, pipeline_batches=20)
        return Sizes(
            kernels.DEVICE_ATTENTION, kernels.DEVICE_GEMM, experts.GPU, runner.DEVICE_SHAPE, plan, 5
        )
    tiny = ("model.d_model=32", "model.n_heads=2", "model.n_layers=2",
            "data.seq_len=64", "data.batch_size=2")  # fmt: skip
    plan = runner.Plan(rounds=1, warmup=0, experts=(4,), pipeline_batches=2)
    small = dataclasses.replace(experts.CPU, d_model=32, ffn_hidden=64, group_tokens=128, rounds=1)
    return Sizes(kernels.CPU_ATTENTION, kernels.CPU_GEMM, small, tiny, plan, 1)


def phase_env() -> dict[str, Any]:
    import flax
    import jax

    from moma_jax.bench.measure import machine
    from moma_jax.bench.report import gpu_peak

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "compute_capability": str(getattr(device, "compute_capability", "")),
        "peak_bf16": gpu_peak(),
        "machine": machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _interleaved_steps(configs: dict[str, Any], rounds: int, seed: int) -> dict[str, float]:
    """Median seconds of each config's train step on dense's first batch, interleaved rounds
    (one warm-up); the compiled steps are dropped afterwards."""
    import jax

    from moma_jax.bench import runner
    from moma_jax.bench.measure import median
    from moma_jax.bench.timed import build_steps, interleave

    batch = runner.first_batch(configs["dense"])
    steps: dict[str, Callable[[], Any]] = dict(build_steps(configs, batch))
    samples = interleave(steps, rounds, 1, seed=seed)
    seconds = {k: median([x.wall_s for x in v]) for k, v in samples.items()}
    jax.clear_caches()
    return seconds


def phase_variants(s: Sizes, data: str, on_gpu: bool) -> dict[str, Any]:
    """Train steps at the bench shape that decide per-backend defaults, interleaved."""
    from moma_jax.bench import runner

    base = (*runner.default_overrides(), *s.bench_overrides, f"data.path={data}")
    attention = "pallas" if on_gpu else "pallas_interpret"
    configs = {
        "dense": runner.bench_config("dense", base),
        f"dense/attention={attention}": runner.bench_config(
            "dense", (*base, f"model.attention={attention}")
        ),
    }
    for arch in ("moe_8x", "moma_4t4i"):
        configs[arch] = runner.bench_config(arch, base)
        configs[f"{arch}/first_fraction=1"] = runner.bench_config(
            arch, (*base, "model.moe.first_fraction=1.0")
        )
    seconds = _interleaved_steps(configs, s.variant_rounds, seed=3)
    return {
        "ms": {k: v * 1e3 for k, v in seconds.items()},
        "vs_default": {k: v / seconds[k.split("/")[0]] for k, v in seconds.items() if "/" in k},
    }


def phase_mamba_scan(s: Sizes, data: str) -> dict[str, Any]:
    """mamba_tiny's train step at the bench shape with the associative and the sequential scan
    (`model.mamba.scan`), and dense's, interleaved."""
    from moma_jax.bench import runner

    base = (*runner.default_overrides(), *s.bench_overrides, f"data.path={data}")
    configs = {"dense": runner.bench_config("dense", base)}
    for path in ("associative", "sequential"):
        scan = f"model.mamba.scan={path}"
        configs[f"mamba/scan={path}"] = runner.bench_config("mamba", (*base, scan))
    seconds = _interleaved_steps(configs, s.variant_rounds, seed=4)
    return {
        "ms": {k: v * 1e3 for k, v in seconds.items()},
        "vs_dense": {k: v / seconds["dense"] for k, v in seconds.items() if k != "dense"},
    }


def phase_bench(s: Sizes, data: str) -> dict[str, Any]:
    from moma_jax.bench import runner

    return runner.run(s.bench_plan, (*s.bench_overrides, f"data.path={data}"))


def run_check(out: Path, data: str, budget_s: float, dry_run: bool, only: tuple[str, ...]) -> dict:
    """Runs the phases in order while the budget lasts; `out/device_check.json` after each."""
    import jax

    from moma_jax.bench import experts, kernels

    start = time.perf_counter()
    on_gpu = jax.default_backend() == "gpu"
    s = sizes(dry_run)
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "budget_s": budget_s,
        "phases": {},
    }
    steps: dict[str, Callable[[], Any]] = {
        "env": phase_env,
        "attention": lambda: kernels.attention_report(s.attention, on_gpu),
        "gemm": lambda: kernels.gemm_report(s.gemm, on_gpu),
        "experts": lambda: experts.run(s.experts, s.first_fractions),
        "variants": lambda: phase_variants(s, data, on_gpu),
        "bench": lambda: phase_bench(s, data),
        "mamba_scan": lambda: phase_mamba_scan(s, data),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name in PHASES:
        if only and name not in only:
            continue
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            report["phases"][name] = {"status": "skipped", "why": f"budget spent ({elapsed:.0f} s)"}
            continue
        print(f"[device_check] {name} at {elapsed:.0f} s", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = {"status": "ok", **steps[name]()}
        except Exception as e:  # one phase's failure must not cost the others' numbers
            result = {"status": "failed", "error": kernels.failure_reason(e)}
        result["phase_s"] = time.perf_counter() - t0
        report["phases"][name] = result
        report["wall_s"] = time.perf_counter() - start
        (out / "device_check.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="device_check.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    prep = sub.add_parser("prepare", help="on the CPU machine: build .device_check/")
    prep.add_argument("--no-wheels", action="store_true", help="skip the wheel download")
    run = sub.add_parser("run", help="on the device: every phase, JSON to --out")
    run.add_argument("--data", required=True, help="a prepared data directory")
    run.add_argument("--out", required=True, help="where device_check.json is written")
    run.add_argument("--budget-s", type=float, default=300.0)
    run.add_argument("--dry-run", action="store_true", help="tiny shapes, any backend")
    run.add_argument("--only", default="", help=f"comma-separated phases of {','.join(PHASES)}")
    args = p.parse_args(argv)
    if args.verb == "prepare":
        try:
            call = prepare(Path.cwd(), wheels=not args.no_wheels)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(call, indent=1))
        return 0
    only = tuple(x for x in args.only.split(",") if x)
    unknown = [x for x in only if x not in PHASES]
    if unknown:
        print(f"error: unknown phase(s) {unknown}; known: {', '.join(PHASES)}", file=sys.stderr)
        return 2
    from moma_jax import host_memory
    from moma_jax.runtime import enable_compilation_cache

    host_memory.keep_freed_memory()
    enable_compilation_cache()
    report = run_check(Path(args.out), args.data, args.budget_s, args.dry_run, only)
    failed = [k for k, v in report["phases"].items() if v["status"] == "failed"]
    print(json.dumps({k: v["status"] for k, v in report["phases"].items()}), file=sys.stderr)
    return 1 if failed else 0
