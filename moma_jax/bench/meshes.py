"""Expert parallelism on 8 simulated CPU devices: the moe_8x train step on (data=2, expert=4),
experts' slot buffers moved by all-to-all, against pure data parallelism (data=8).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m moma_jax.bench.meshes

The 8 "devices" share this machine's cores, so the ratio only shows that the communication is
not pathological; it is not a cluster measurement. One JSON object on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

import jax

from moma_jax import host_memory
from moma_jax.bench.measure import machine, median
from moma_jax.bench.runner import bench_config, first_batch
from moma_jax.bench.timed import StepBench, interleave, log
from moma_jax.config import MeshConfig
from moma_jax.runtime import enable_compilation_cache
from moma_jax.sharding import check_mesh, make_mesh

MESHES = {"data=8": MeshConfig(data=8), "data=2,expert=4": MeshConfig(data=2, expert=4)}
ROUNDS = 10


def main() -> int:
    host_memory.keep_freed_memory()
    if len(jax.devices()) != 8:
        print("error: run with XLA_FLAGS=--xla_force_host_platform_device_count=8", file=sys.stderr)
        return 2
    enable_compilation_cache()
    # One 256-token row per routing group, so each of the 8 batch shards holds one group.
    base = bench_config("moe_8x", ("model.moe.routing_group_tokens=256",))
    batch = first_batch(base)
    steps: dict[str, StepBench] = {}
    for name, mesh in MESHES.items():
        cfg = dataclasses.replace(base, mesh=mesh)
        check_mesh(cfg, dict(make_mesh(mesh).shape))
        log(f"compiling moe_8x on {name}")
        steps[name] = StepBench(cfg, batch, devices=jax.devices())
    samples = interleave(dict[str, Callable[[], Any]](steps), ROUNDS, warmup=2)
    seconds = {k: median([s.wall_s for s in v]) for k, v in samples.items()}
    report = {
        "machine": machine(),
        "step_s": seconds,
        "expert_parallel_over_data_parallel": seconds["data=2,expert=4"] / seconds["data=8"],
        "losses": {k: float(s.metrics["loss"]) for k, s in steps.items()},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
