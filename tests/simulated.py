"""Subprocesses with N simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`)
sharing the test session's compilation cache: the multi-device tests (test_distributed*.py).

Losses match to rtol 1e-4, not bitwise: a sharded step splits sums (over batch shards, over
the hidden size under tensor parallelism) into partial sums added in another order, so float32
rounding differs in the last bits (measured: at most 1e-5 relative over 3 steps).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-4


def devices_env(n: int) -> dict[str, str]:
    """n simulated CPU devices, and the test session's compilation cache."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    # XLA:CPU aborts a collective whose participants have not all arrived within 40 s. Two
    # causes were seen: a real stall (devices waiting in different collectives, which no wait
    # ends: a new run is the cure) and, with 8 simulated devices sharing 2 cores beside other
    # work, device threads slower than 40 s. 90 s leaves the slow ones room; `run_simulated`
    # retries the stalls.
    flags += " --xla_cpu_collective_call_terminate_timeout_seconds=90"
    cache = getattr(jax.config, "jax_compilation_cache_dir")  # noqa: B009 (untyped flag)
    return {
        **os.environ,
        "XLA_FLAGS": flags.strip(),
        "PYTHONPATH": str(ROOT),
        "MOMA_JAX_COMPILE_CACHE": str(cache),
    }


def run_simulated(cmd: list[str], devices: int) -> subprocess.CompletedProcess:
    """`cmd` with `devices` simulated CPU devices, run up to 3 times while XLA:CPU aborts a
    collective for its rendezvous timeout (`devices_env`): a scheduling stall of the CPU
    runtime, not a wrong result. Any other failure fails the test."""
    for attempt in range(3):
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=devices_env(devices), cwd=ROOT
        )
        if out.returncode == 0 or "Termination timeout for" not in out.stderr or attempt == 2:
            break
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def assert_shards_as_one_device(runs: dict, meshes: int) -> None:
    """`mesh_runs.py` output for one architecture: on each of its `meshes` meshes, the losses of
    3 steps are the one-device ones, every leaf is sharded as the logical table says, and some
    leaves are sharded."""
    reference = runs.pop("1")["losses"]
    assert len(runs) == meshes
    for mesh, run in runs.items():
        assert run["losses"] == pytest.approx(reference, rel=RTOL), mesh
        assert run["wrong_shardings"] == [], (mesh, run["wrong_shardings"][:3])
        assert run["sharded_leaves"] > 0, mesh


def mesh_runs(*archs: str) -> dict:
    """`mesh_runs.py`'s output for each architecture, one subprocess each (a stalled run is
    retried alone)."""
    script = str(ROOT / "tests" / "mesh_runs.py")
    out = {}
    for arch in archs:
        proc = run_simulated([sys.executable, script, arch], 8)
        # XLA logs this when it cannot reshard a value except by replicating it (it did for the
        # embedding lookup before model/lookup.py); logged at compile time, so on a fresh
        # compilation cache (CI's clean clone), not where the session's cache already holds it.
        assert "Involuntary full rematerialization" not in proc.stderr, (arch, proc.stderr[-3000:])
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out
