"""Orbax checkpoints holding the train state, the Grain iterator state, the config and the
data manifest in one atomic step directory.

Orbax writes each step into a temporary folder and commits it by rename, so a process killed
mid-save leaves the previous step as the latest; leftovers are cleaned at the next start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from moma_jax.config import RunConfig


class Checkpointer:
    """Keep-last-N plus keep-every-K, async saves, one composite checkpoint per step."""

    def __init__(self, directory: Path, run: RunConfig):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=run.keep_last,
            keep_period=run.keep_every or None,
            enable_async_checkpointing=run.async_checkpoint,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, config: dict, manifest: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(config),
                manifest=ocp.args.JsonSave(manifest),
            ),
        )

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
        """Restores the state into the shardings of `abstract_state`; the iterator in place."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        return restored.state

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        ).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
