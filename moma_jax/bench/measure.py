"""Measurement primitives for the benchmark: timed samples with CPU and page-fault counts,
robust summaries, and the machine's description."""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from moma_jax import host_memory


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
        "env": {k: os.environ.get(k, "") for k in ("GLIBC_TUNABLES", "XLA_FLAGS", "LD_PRELOAD")},
        "host_malloc": host_memory.applied,
    }


def device_memory() -> dict[str, int] | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    if not stats:
        return None
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}
