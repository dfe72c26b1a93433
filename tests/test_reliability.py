"""A run that dies loses nothing: SIGKILL at random points, damaged checkpoints, NaN/Inf."""

import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_args import small

from moma_jax.commands.cli import main
from moma_jax.train import step as step_lib
from moma_jax.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = str(jax.config.values["jax_compilation_cache_dir"])  # set by conftest.py
STEPS = 12
ARGS = [
    "--exp",
    "dense_tiny",
    *small("run.log_every=1", "run.eval_every=100", "run.eval_batches=1", "run.checkpoint_every=3"),
]


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


def params(workdir: Path, step: int):
    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    return ocp.PyTreeCheckpointer().restore(path)["params"]


def assert_same_run(a: Path, b: Path, last: int = STEPS) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(1, last + 1))  # each step exactly once
    assert la == lb  # bitwise: float equality of every logged loss
    jax.tree.map(np.testing.assert_array_equal, params(a, last), params(b, last))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("straight")
    assert main([*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]) == 0
    return workdir


def _logged_steps(proc: subprocess.Popen, steps: queue.Queue, err: list[str]) -> None:
    """Puts (step, arrival time) for each progress line the child prints, None at its end.

    The child's own stderr, not metrics.jsonl: a resumed child's file still holds the killed
    run's later lines until it truncates them, and a pipe wakes the reader at once.
    """
    assert proc.stderr is not None
    for line in proc.stderr:
        err.append(line)
        if match := re.match(r"step (\d+)/", line):
            steps.put((int(match[1]), time.monotonic()))
    steps.put(None)


def _next_step(steps: queue.Queue, timeout: float) -> tuple[int, float] | None:
    """The next logged (step, time); None if the child ended or `timeout` passed first."""
    try:
        return steps.get(timeout=max(timeout, 0.0))
    except queue.Empty:
        return None


def test_sigkill_at_random_points_resumes_bitwise(straight, tmp_path):
    """Kill the training process 3 times, each a random fraction of a step after a logged step:
    two random steps (kills inside steps) and checkpoint step 6 (a kill while its async save is
    in flight); the restarted run matches the uninterrupted one.

    The delay is drawn in units of the step time measured from the children's own progress
    lines, and the kill comes early if the next step is logged first, so a kill always lands
    inside the run, before step 12, however fast the machine (with a warm compile cache a CPU
    runs the last steps in tens of milliseconds).
    """
    workdir = tmp_path / "killed"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        *ARGS,
        "--workdir",
        str(workdir),
        "--steps",
        str(STEPS),
    ]
    env = {**os.environ, "MOMA_JAX_COMPILE_CACHE": CACHE_DIR}
    rng = random.Random(0)
    targets = sorted([6, *rng.sample([2, 4, 5, 7, 8, 10], 2)])
    step_s: list[float] = []  # seconds between consecutive logged steps, every child
    for target in targets:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        steps: queue.Queue = queue.Queue()
        err: list[str] = []
        threading.Thread(target=_logged_steps, args=(proc, steps, err), daemon=True).start()
        deadline, previous = time.monotonic() + 240, None
        while (seen := _next_step(steps, deadline - time.monotonic())) is not None:
            if previous and previous[0] >= 1 and seen[0] == previous[0] + 1:  # not compile
                step_s.append(seen[1] - previous[1])
            previous = seen
            if seen[0] >= target:
                break
        assert seen is not None, f"step {target} never logged:\n" + "".join(err)[-2000:]
        # A kill before the first checkpoint committed is the refused-without---restart case
        # (tests/test_run_safety.py); here step 3's async save is committed first.
        wait_until = time.monotonic() + 60
        while not (workdir / "checkpoints" / "3").is_dir() and time.monotonic() < wait_until:
            time.sleep(0.05)
        # The first child starts fresh and targets are >= 2: there is a step time by now.
        _next_step(steps, rng.uniform(0.0, statistics.median(step_s)))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "".join(err)[-2000:]  # killed mid-run
    assert max(losses(workdir)) < STEPS
    assert main([*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]) == 0
    assert_same_run(straight, workdir)


def _files(step_dir: Path) -> list[Path]:
    return sorted(
        (p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes"])
def test_damaged_latest_checkpoint_falls_back_to_previous(damage, straight, tmp_path, capsys):
    workdir = tmp_path / damage
    assert main([*ARGS, "--workdir", str(workdir), "--steps", "9"]) == 0
    biggest = _files(workdir / "checkpoints" / "9")[-1]
    data = bytearray(biggest.read_bytes())
    if damage == "truncate":
        biggest.write_bytes(bytes(data[: len(data) // 2]))
    else:
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0xFF
        biggest.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]) == 0
    captured = capsys.readouterr()
    assert "checkpoint step 9 is damaged" in captured.err
    assert "at step 6" in captured.out  # resumed from the previous checkpoint
    assert (workdir / "checkpoints" / "9.corrupt").is_dir()  # kept aside for inspection
    assert_same_run(straight, workdir)


@pytest.mark.parametrize("metric", ["loss", "grads"])
def test_injected_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
    metric, straight, tmp_path, monkeypatch, capsys
):
    """A NaN at step 5 (in the loss, or in the gradients) stops the run naming step 5; the step
    6 state is never saved; the run resumes from step 3 once the fault is gone."""
    real = step_lib.make_train_step

    def faulty(graphdef, cfg, tx):
        inner = real(graphdef, cfg, tx)

        def train_step(state, batch):
            new_state, metrics = inner(state, batch)
            poison = jnp.where(state.step + 1 == 5, jnp.nan, 0.0)
            if metric == "loss":
                metrics = {**metrics, "loss": metrics["loss"] + poison}
            else:
                params = jax.tree.map(lambda p: p + poison, new_state.params)
                new_state = new_state.replace(params=params)
                metrics = {**metrics, "grad_norm": metrics["grad_norm"] + poison}
            return new_state, metrics

        return train_step

    workdir = tmp_path / metric
    monkeypatch.setattr("moma_jax.train.step.make_train_step", faulty)
    assert main([*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]) == 1
    err = capsys.readouterr().err
    expected = "loss" if metric == "loss" else "grad_norm"
    assert f"step 5: {expected} is nan" in err
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3]
    monkeypatch.undo()
    assert main([*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]) == 0
    assert_same_run(straight, workdir)
