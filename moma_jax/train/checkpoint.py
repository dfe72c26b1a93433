"""Orbax checkpoints holding the train state, the Grain iterator state, the config, the data
manifest and a fingerprint of all of them in one atomic step directory; and the one verified,
read-only way to open a run's checkpoints (`RunCheckpoints`), used by training's resume,
`--init-from`, evaluate, generate, analysis and compare alike.

Writing: Orbax writes each step into a temporary folder and commits it by rename, so a process
killed mid-save leaves the previous step as the latest. `Checkpointer.save` refuses a state
with a non-finite value (an all-finite reduction on device over parameters and optimizer
state): no committed checkpoint holds NaN or Inf.

Verifying (`RunCheckpoints.restore`): a step is intact when it restores, its state's bits match
the fingerprint saved with it, every value is finite, and the saved data-iterator positions,
config and manifest match their digests in the fingerprint (an edited position would resume
elsewhere in the data). Anything else is a `CheckpointDamagedError` naming the step.

Nothing here renames or deletes a step: readers open runs read-only (Orbax `read_only`, no
directory is created). Only the training loop, holding its own workdir's lock, moves a damaged
step aside (`move_aside`) once an older intact step was found to resume from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moma_jax.config import ConfigError, ExperimentConfig, RunConfig
from moma_jax.overrides import from_dict, resume_conflicts

FINGERPRINT_VERSION = 2  # 1: state bits only; 2: + finite, data positions, config, manifest
_ORBAX_TMP = "orbax-checkpoint-tmp"  # Orbax's name for a step still being written


class CheckpointDamagedError(ValueError):
    """A committed step that does not restore, or does not match its fingerprint."""

    def __init__(self, step: int, problem: str):
        super().__init__(f"checkpoint step {step} is damaged ({problem})")
        self.step, self.problem = step, problem


class NonFiniteStateError(RuntimeError):
    """A state with NaN or Inf was about to be checkpointed; it was not."""


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


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.bool_(True)]))


def all_finite(state: Any) -> bool:
    """Every floating value of `state` (parameters, optimizer moments) is finite."""
    return bool(jax.device_get(_all_finite(state)))


def digest(obj: Any) -> str:
    """sha256 of a JSON value, independent of key order and of tuple vs list."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _data_digests(data_iter: Any) -> list[str]:
    """The digest of each process's iterator position, in process order (every process gets
    the whole list; process 0 writes it)."""
    mine = digest(data_iter.get_state())
    if jax.process_count() == 1:
        return [mine]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(bytes.fromhex(mine), dtype=np.uint8)
    every = np.asarray(multihost_utils.process_allgather(raw))
    return [bytes(row.astype(np.uint8)).hex() for row in every.reshape(-1, raw.size)]


def committed_steps(directory: Path) -> list[int]:
    """Steps whose checkpoint finished writing (Orbax renames a step into place last); reads
    only, and an absent directory has none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def other_entries(directory: Path) -> list[str]:
    """Names in a checkpoint directory that are not committed steps nor Orbax's unfinished
    writes: steps moved aside (`9.corrupt`), or anything a user put there."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p.name
        for p in directory.iterdir()
        if not (p.is_dir() and p.name.isdigit()) and _ORBAX_TMP not in p.name
    )


@contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax and TensorStore log every failed read of a damaged step at ERROR level, in many
    lines; the caller reports the damage in one."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None  # "Exception ignored in ..." of dead readers
    try:
        yield
    finally:
        sys.unraisablehook = previous
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class Checkpointer:
    """Keep-last-N plus keep-every-K, async saves, one composite checkpoint per step. Used
    only by a training run on its own (locked) workdir."""

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
        """Saves one step (asynchronously); raises NonFiniteStateError, saving nothing, if any
        value of `state` is NaN or Inf."""
        if not all_finite(state):
            raise NonFiniteStateError(
                f"step {step}: the state holds NaN or Inf (parameters or optimizer state); it "
                "was not checkpointed"
            )
        prints = {
            "version": FINGERPRINT_VERSION,
            "state": fingerprint(state),
            "data": _data_digests(data_iter),
            "config": digest(config),
            "manifest": digest(manifest),
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(config),
                manifest=ocp.args.JsonSave(manifest),
                fingerprint=ocp.args.JsonSave(prints),
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def check_for_errors(self) -> None:
        """Raises the error of a finished async save (e.g. a full disk), at the next step."""
        self.manager.check_for_errors()

    def committed_steps(self) -> list[int]:
        return committed_steps(self.directory)

    def close(self) -> None:
        self.manager.close()


@dataclasses.dataclass(frozen=True)
class RunCheckpoints:
    """A run's checkpoint directory, opened read-only: nothing here writes, creates, renames or
    deletes a file, so it may point at another run, a shared directory or a read-only disk."""

    directory: Path

    @property
    def steps(self) -> list[int]:
        return committed_steps(self.directory)

    def _json(self, step: int, item: str) -> Any:
        path = self.directory / str(step) / item / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointDamagedError(step, f"its {item} is unreadable: {e}") from None

    def manifest(self, step: int) -> dict[str, Any]:
        """The data manifest saved in checkpoint `step` (the data its state was trained on)."""
        saved = self._json(step, "manifest")
        if not isinstance(saved, dict):
            raise CheckpointDamagedError(step, "its manifest is not a JSON object")
        return saved

    def state_fingerprint(self, step: int) -> list[int]:
        """The saved hashes of checkpoint `step`'s state (equal states, equal lists)."""
        return list(self._fingerprint(step)["state"])

    def processes(self, step: int) -> int | None:
        """How many processes saved a data position in checkpoint `step` (None: a version-1
        checkpoint, which does not say)."""
        data = self._fingerprint(step).get("data")
        return None if data is None else len(data)

    def config(self, step: int) -> ExperimentConfig:
        """The config saved in checkpoint `step` (what its state was trained with)."""
        saved = self._json(step, "config")
        try:
            return from_dict(ExperimentConfig, saved)
        except (ConfigError, TypeError) as e:
            raise CheckpointDamagedError(step, f"its config does not load: {e}") from None

    def check_config(self, step: int, cfg: ExperimentConfig) -> None:
        """Refuses (ConfigError) a run whose config.json, `cfg`, differs from the config saved
        in checkpoint `step` outside the resume-safe keys: the state would be read, evaluated
        or upcycled under a config it was not trained with."""
        conflicts = resume_conflicts(self.config(step), cfg)
        if conflicts:
            raise ConfigError(
                f"{self.directory.parent / 'config.json'} differs from the config saved in "
                f"checkpoint step {step} (what its state was trained with):\n  "
                + "\n  ".join(conflicts)
                + "\nrestore config.json from the checkpoint's config/metadata"
            )

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """The verified state of `step` in the shardings of `abstract_state` (and, given
        `data_iter`, its position restored in place); CheckpointDamagedError otherwise.

        In a multi-process run every process reaches the same verdict: the file checks and the
        (collective) restore are each followed by an all-gather of the outcome, so a step one
        host cannot read is damaged for all, and no host waits in a collective the others left.
        """
        if step not in self.steps:
            raise ValueError(
                f"{self.directory} has no committed checkpoint step {step}; it has {self.steps}"
            )
        problem = None
        try:  # the small files first: read only, no collective
            prints = self._fingerprint(step)
            self._verify_items(step, prints)
        except CheckpointDamagedError as e:
            problem = e.problem
        _agree(step, problem)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        try:
            with _quiet_orbax():
                mgr = ocp.CheckpointManager(self.directory, options=options)
                try:
                    restored = mgr.restore(step, args=ocp.args.Composite(**items))
                finally:
                    mgr.close()
        except Exception as e:  # a committed step that does not read back is damaged
            if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
                raise  # out of memory is not damage: the step is left as it is
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        _agree(step, problem)
        state = restored.state
        if fingerprint(state) != prints["state"]:  # global values: the same on every process
            raise CheckpointDamagedError(step, "its state does not match its fingerprint")
        if not all_finite(state):
            raise CheckpointDamagedError(step, "its state holds NaN or Inf")
        return state

    def _fingerprint(self, step: int) -> dict[str, Any]:
        """The step's fingerprint, its shape checked (a wrong one is damage, not a crash)."""
        prints = self._json(step, "fingerprint")
        ok = isinstance(prints, dict) and _is_list(prints.get("state"), int)
        version = prints.get("version", 1) if ok else None
        if ok and version != 1:
            ok = (
                version == FINGERPRINT_VERSION
                and _is_list(prints.get("data"), str)
                and all(isinstance(prints.get(k), str) for k in ("config", "manifest"))
            )
        if not ok:
            raise CheckpointDamagedError(step, "its fingerprint is not one this code wrote")
        return prints

    def _verify_items(self, step: int, prints: dict[str, Any]) -> None:
        """The data positions, config and manifest saved beside the state match their digests
        (checkpoints of fingerprint version 1 have none: state bits only)."""
        if prints.get("version", 1) == 1:
            return
        for item in ("config", "manifest"):
            if digest(self._json(step, item)) != prints[item]:
                raise CheckpointDamagedError(step, f"its {item} does not match its fingerprint")
        data_dir = self.directory / str(step) / "data"
        n = len(prints["data"])
        for i, expected in enumerate(prints["data"]):  # every host's: checkpoints are shared
            path = data_dir / f"process_{i}-of-{n}.json"
            try:
                position = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                problem = f"its data position is unreadable: {e}"
                raise CheckpointDamagedError(step, problem) from None
            if digest(position) != expected:
                raise CheckpointDamagedError(
                    step, f"its data-iterator position ({path.name}) does not match its fingerprint"
                )

    def latest_intact(
        self, abstract_state: Any, data_iter: Any = None, *, before: int | None = None
    ) -> tuple[int, Any, list[int]]:
        """(step, state, damaged steps) for the newest intact step (`before`: below it), each
        damaged one reported on stderr; (0, None, damaged) when none is intact."""
        damaged: list[int] = []
        for step in reversed(self.steps):
            if before is not None and step >= before:
                continue
            try:
                return step, self.restore(step, abstract_state, data_iter), damaged
            except CheckpointDamagedError as e:
                warn(f"{e}; trying the previous one")
                damaged.append(step)
        return 0, None, damaged


def _is_list(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(
        isinstance(x, kind) and not isinstance(x, bool) for x in value
    )


def _agree(step: int, problem: str | None) -> None:
    """Raises CheckpointDamagedError on every process if any process found `step` damaged."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(problem is not None))
        if np.any(flags) and problem is None:
            problem = "another process could not read it"
    if problem is not None:
        raise CheckpointDamagedError(step, problem)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def move_aside(directory: Path, step: int) -> Path:
    """Renames the damaged `step` to `STEP.corrupt[.N]`, kept for inspection and out of Orbax's
    way. Only the training run that owns (and has locked) the directory calls this."""
    path = Path(directory) / str(step)
    target, n = path.with_name(f"{path.name}.corrupt"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt.{n}"), n + 1
    path.rename(target)
    return target
