"""Ahead-of-time fit check: compile an experiment's train step for a mesh of simulated CPU
devices, without running it or allocating a weight, and report per-device memory and the
collectives the step contains.

    python scripts/describe.py --exp NAME --mesh data=8,fsdp=8 --aot [--device-memory 80GB]

`describe.py` runs this module in a subprocess with `XLA_FLAGS=
--xla_force_host_platform_device_count=N` (N = the mesh's size), so the simulated device count
never leaks into the caller. The memory numbers are XLA's CPU-compiler estimate of one device's
peak: arguments + outputs - aliased (donated) + temporaries; a GPU or TPU compiler schedules
differently, so treat them as an estimate, not a guarantee.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from moma_jax.config import ConfigError, ExperimentConfig, MeshConfig, validate
from moma_jax.runtime import (
    add_experiment_args,
    experiment_config,
    load_experiment_modules,
    resolve_shares,
)
from moma_jax.sharding import MESH_AXES, batch_sharding, check_mesh, make_mesh
from moma_jax.train.state import init_state, make_optimizer
from moma_jax.train.step import jit_train_step
from moma_jax.units import byte_size

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
BATCH_KEYS = ("tokens", "modality", "segment_ids", "positions")


def parse_mesh(text: str) -> MeshConfig:
    """'data=8,fsdp=8' -> MeshConfig (unnamed axes 1); ConfigError naming a bad entry."""
    sizes = {a: 1 for a in MESH_AXES}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(
                f"--mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS in {MESH_AXES}"
            )
        sizes[name.strip()] = int(value)
    return MeshConfig(**sizes)


def _bytes_per_device(tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def compile_report(cfg: ExperimentConfig) -> dict[str, Any]:
    """Lower and compile the train step of `cfg` on this process's devices (the mesh's size)."""
    mesh = make_mesh(cfg.mesh)
    check_mesh(cfg, dict(mesh.shape))
    tx = make_optimizer(cfg.optim, cfg.model.aux_routers)
    graphdef, _, abstract, shardings = init_state(cfg, tx, mesh)
    batch_sh = batch_sharding(mesh)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sh) for k in BATCH_KEYS}
    step: Any = jit_train_step(graphdef, cfg, tx, shardings, batch_sh, mesh)
    start = time.perf_counter()
    compiled = step.lower(abstract, batch).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    hlo = compiled.as_text()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    peak += m.temp_size_in_bytes
    return {
        "micro_batches": cfg.data.micro_batches,
        "remat": cfg.model.remat,
        "memory_per_device_bytes": int(peak),
        "params_per_device_bytes": _bytes_per_device(abstract.params),
        "optimizer_per_device_bytes": _bytes_per_device(abstract.opt_state),
        "temp_per_device_bytes": int(m.temp_size_in_bytes),
        "arguments_bytes": int(m.argument_size_in_bytes),
        "outputs_bytes": int(m.output_size_in_bytes),
        "aliased_bytes": int(m.alias_size_in_bytes),
        "collectives": {c: len(re.findall(rf"\b{c}(?:-start)?\(", hlo)) for c in COLLECTIVES},
        "compile_s": round(compile_s, 1),
    }


def fit(cfg: ExperimentConfig, device_memory: int | None) -> dict[str, Any]:
    """The report at the config's micro_batches; with `device_memory`, doubling micro_batches
    until the estimate fits (or the micro-batch cannot be split further)."""
    trials = []
    while True:
        report = compile_report(cfg)
        trials.append(report)
        if device_memory is None or report["memory_per_device_bytes"] <= device_memory:
            break
        more = dataclasses.replace(cfg.data, micro_batches=cfg.data.micro_batches * 2)
        try:
            candidate = validate(dataclasses.replace(cfg, data=more))
            check_mesh(candidate, dict(make_mesh(candidate.mesh).shape))
        except ConfigError:
            break
        cfg = candidate
    out = dict(trials[-1])
    out["trials"] = [
        {
            "micro_batches": t["micro_batches"],
            "memory_per_device_bytes": t["memory_per_device_bytes"],
        }
        for t in trials
    ]
    if device_memory is not None:
        out["device_memory_bytes"] = device_memory
        out["fits"] = out["memory_per_device_bytes"] <= device_memory
    return out


def run_in_subprocess(
    exp: str, overrides: list[str], mesh: MeshConfig, device_memory: int | None, modules: list[str]
) -> dict[str, Any]:
    """`main` in a fresh process with the mesh's number of simulated CPU devices."""
    n = math.prod(getattr(mesh, a) for a in MESH_AXES)
    text = ",".join(f"{a}={getattr(mesh, a)}" for a in MESH_AXES)
    cmd = [sys.executable, "-m", "moma_jax.commands.aot", "--exp", exp, "--mesh", text]
    cmd += [a for o in overrides for a in ("--set", o)]
    cmd += [a for m in modules for a in ("--experiments", m)]
    if device_memory is not None:
        cmd += ["--device-memory", str(device_memory)]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:")]
        raise ConfigError(lines[-1][7:] if lines else out.stderr.strip()[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moma_jax.commands.aot", description=__doc__)
    add_experiment_args(p, exp_required=True)
    p.add_argument("--mesh", required=True, help="e.g. data=8,fsdp=8,expert=1,tensor=1")
    p.add_argument("--device-memory", type=byte_size, help="bytes per device to fit in")
    args = p.parse_args(argv)
    try:
        load_experiment_modules(args)
        mesh = parse_mesh(args.mesh)
        n = math.prod(getattr(mesh, a) for a in MESH_AXES)
        if len(jax.devices()) != n:
            raise ConfigError(
                f"--mesh {args.mesh} needs {n} devices, this process has {len(jax.devices())}; "
                "run it through describe.py --aot, which starts a process with that many"
            )
        cfg = experiment_config(args.exp, args.overrides)
        cfg = resolve_shares(dataclasses.replace(cfg, mesh=mesh))
        report = fit(cfg, args.device_memory)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["mesh"] = {a: getattr(mesh, a) for a in MESH_AXES}
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["note"] = "XLA CPU-compiler estimate of one device's peak"
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
