"""A run that dies loses nothing: SIGKILL at random points, damaged checkpoints, NaN/Inf."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_args import small

from moma_jax.cli import main
from moma_jax.train import step as step_lib
from moma_jax.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
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


def test_sigkill_at_random_points_resumes_bitwise(straight, tmp_path):
    """Kill the training process 3 times, each after a logged step plus a random delay: two
    random steps (kills inside steps) and checkpoint step 6 (a kill while its async save is in
    flight); the restarted run matches the uninterrupted one."""
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
    env = {**os.environ, "MOMA_JAX_COMPILE_CACHE": jax.config.jax_compilation_cache_dir}
    rng = random.Random(0)
    targets = sorted([6, *rng.sample([2, 4, 5, 7, 8, 10], 2)])
    for target in targets:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            done = losses(workdir) if (workdir / "metrics.jsonl").exists() else {}
            if done and max(done) >= target:
                time.sleep(rng.uniform(0.0, 0.3))
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]  # killed mid-run
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
