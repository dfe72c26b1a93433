"""Orbax checkpoints holding the train state, the Grain iterator state, the config, the data
manifest and a fingerprint of the state in one atomic step directory.

Orbax writes each step into a temporary folder and commits it by rename, so a process killed
mid-save leaves the previous step as the latest; leftovers are cleaned at the next start. A
committed step that was damaged later (truncated or corrupted files) fails to restore or fails
its fingerprint check; `restore_latest` then warns, moves it aside as `STEP.corrupt`, and
restores the step before it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from moma_jax.config import RunConfig


@jax.jit
def _leaf_hashes(tree: Any) -> list[jax.Array]:
    """A position-weighted uint32 sum of each leaf's bits: any changed bit changes it."""

    def one(x: jax.Array) -> jax.Array:
        x = x.reshape(-1)
        if x.dtype.itemsize != 4:
            x = x.astype(jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32)
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        weights = (jnp.arange(x.size, dtype=jnp.uint32) % jnp.uint32(65_521)) + jnp.uint32(1)
        return jnp.sum(bits * weights, dtype=jnp.uint32)

    return [one(x) for x in jax.tree.leaves(tree)]


def fingerprint(state: Any) -> list[int]:
    return [int(h) for h in jax.device_get(_leaf_hashes(state))]


class Checkpointer:
    """Keep-last-N plus keep-every-K, async saves, one composite checkpoint per step."""

    def __init__(self, directory: Path, run: RunConfig):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=run.keep_last,
            keep_period=run.keep_every or None,
            enable_async_checkpointing=run.async_checkpoint,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, config: dict, manifest: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(config),
                manifest=ocp.args.JsonSave(manifest),
                fingerprint=ocp.args.JsonSave({"state": fingerprint(state)}),
            ),
        )

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        """Restores one step into the shardings of `abstract_state` (the iterator in place);
        raises if the step is damaged."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
                fingerprint=ocp.args.JsonRestore(),
            ),
        )
        if fingerprint(restored.state) != restored.fingerprint["state"]:
            raise ValueError("the restored state does not match the fingerprint saved with it")
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def check_for_errors(self) -> None:
        """Raises the error of a finished async save (e.g. a full disk), at the next step."""
        self.manager.check_for_errors()

    def committed_steps(self) -> list[int]:
        """Steps whose checkpoint finished writing (Orbax renames a step into place last)."""
        if not self.directory.is_dir():
            return []
        return sorted(
            int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()
        )

    def close(self) -> None:
        self.manager.close()


def restore_latest(directory: Path, run: RunConfig, abstract_state: Any, data_iter: Any):
    """(step, state) of the newest intact checkpoint, or (0, None) when there is none.

    Damaged steps are reported on stderr and renamed `STEP.corrupt` (kept for inspection, out
    of Orbax's way); if every step is damaged the run stops rather than silently restarting.
    """
    if not Path(directory).is_dir():
        return 0, None
    ckpt = Checkpointer(directory, run)
    steps = ckpt.all_steps()
    damaged = []
    try:
        for step in reversed(steps):
            try:
                return step, ckpt.restore(step, abstract_state, data_iter)
            except Exception as e:  # any failure to read a committed step means it is damaged
                print(
                    f"warning: checkpoint step {step} is damaged ({type(e).__name__}: "
                    f"{str(e)[:200]}); trying the previous one",
                    file=sys.stderr,
                    flush=True,
                )
                damaged.append(step)
    finally:
        ckpt.close()
        for step in damaged:
            _move_aside(Path(directory) / str(step))
    if steps:
        raise ValueError(
            f"every checkpoint in {directory} is damaged (steps {steps}, renamed *.corrupt); "
            "restart in a new --workdir"
        )
    return 0, None


def _move_aside(path: Path) -> None:
    target, n = path.with_name(f"{path.name}.corrupt"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt.{n}"), n + 1
    path.rename(target)
