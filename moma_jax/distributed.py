"""Several processes (hosts): `jax.distributed.initialize` from flags or the environment.

    python scripts/train.py --exp NAME --coordinator HOST:PORT --num-processes N --process-id I
    python scripts/train.py --exp NAME --distributed     # TPU pods, SLURM, ...: auto-detected

Without flags the variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
are read. Each process loads only its slice of every batch (the Grain pipeline slices by
process), checkpoints are written and restored by all processes together (Orbax), and only
process 0 writes the workdir's config, metrics and TensorBoard files. On CPU the processes'
collectives go through gloo (`jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import argparse
import os

import jax

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several processes")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    g.add_argument("--num-processes", type=int, help="how many processes take part")
    g.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="initialise from the cluster's environment (TPU pods, SLURM, ...)",
    )


def initialize(args: argparse.Namespace) -> bool:
    """Joins the processes when asked to (flags, JAX_* variables or --distributed); returns
    whether it did. Call before anything touches a JAX device."""
    coordinator = args.coordinator or os.environ.get(ENV[0])
    num_processes = args.num_processes or _int_env(ENV[1])
    process_id = args.process_id if args.process_id is not None else _int_env(ENV[2])
    if not args.distributed and coordinator is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; else ignored
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True


def is_primary() -> bool:
    """Process 0: the one that writes the workdir's shared files."""
    return jax.process_index() == 0


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
