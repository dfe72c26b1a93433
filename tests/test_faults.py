"""Faults of real clusters, with real processes: a second run on a busy workdir, SIGKILL and a
stale lock, SIGTERM and double Ctrl-C, a full disk (a real tmpfs), damaged data shards."""

import errno
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_args import small

from moma_jax.commands.cli import main
from moma_jax.config import RunConfig
from moma_jax.data import ensure_data
from moma_jax.train.checkpoint import Checkpointer
from moma_jax.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = str(jax.config.values["jax_compilation_cache_dir"])  # set by conftest.py
STEPS = 12
KEYS = ("run.log_every=1", "run.eval_every=100", "run.eval_batches=1", "run.checkpoint_every=3")
ARGS = ["--exp", "dense_tiny", *small(*KEYS)]


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(1, STEPS + 1)) and la == lb  # each step once, bitwise
    pa, pb = (
        ocp.PyTreeCheckpointer().restore((w / "checkpoints" / str(STEPS) / "state").absolute())
        for w in (a, b)
    )
    jax.tree.map(np.testing.assert_array_equal, pa["params"], pb["params"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("straight")
    assert main([*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]) == 0
    return workdir


class Child:
    """`scripts/train.py` in a process; `wait_for_step(k)` blocks until it logged step k."""

    def __init__(self, workdir: Path, *extra: str, steps: int = STEPS):
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *ARGS, *extra]
        cmd += ["--workdir", str(workdir), "--steps", str(steps)]
        env = {**os.environ, "MOMA_JAX_COMPILE_CACHE": CACHE_DIR}
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.steps: queue.Queue = queue.Queue()
        self.err: list[str] = []
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)
            if match := re.match(r"step (\d+)/", line):
                self.steps.put(int(match[1]))
        self.steps.put(None)

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        self.out.extend(self.proc.stdout)

    def wait_for_step(self, k: int) -> None:
        deadline = time.monotonic() + 240
        while True:
            seen = self.steps.get(timeout=max(deadline - time.monotonic(), 0.01))
            assert seen is not None, "".join(self.err)[-2000:]
            if seen >= k:
                return

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=240)
        time.sleep(0.2)  # the reader threads drain the pipes
        return code, "".join(self.err)


def test_a_second_run_on_a_busy_workdir_is_refused_and_changes_nothing(tmp_path, capsys):
    workdir = tmp_path / "busy"
    first = Child(workdir, *small(*KEYS, "optim.total_steps=4000"), steps=4000)
    first.wait_for_step(2)
    before = {p: p.read_bytes() for p in (workdir / "config.json", workdir / ".lock")}
    args = [*ARGS, "--workdir", str(workdir), *small(*KEYS, "optim.total_steps=4000")]
    assert main([*args, "--steps", "4000"]) == 1
    err = capsys.readouterr().err
    assert f"workdir {workdir} is in use by pid {first.proc.pid} on host" in err, err
    assert {p: p.read_bytes() for p in before} == before  # the refused run wrote nothing
    first.proc.send_signal(signal.SIGTERM)
    code, err = first.finish()
    assert code == 143, err[-2000:]


def test_sigkill_leaves_no_lock_that_blocks_the_restart(straight, tmp_path):
    workdir = tmp_path / "killed"
    child = Child(workdir)
    child.wait_for_step(4)
    deadline = time.monotonic() + 60
    while not (workdir / "checkpoints" / "3").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)  # step 3's async save committed: the restart resumes from it
    child.proc.send_signal(signal.SIGKILL)
    child.finish()
    assert "pid" in (workdir / ".lock").read_text()  # the dead run's stamp is still there
    assert main([*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]) == 0
    assert_same_run(straight, workdir)


def test_sigterm_saves_where_it_says_and_resumes_bitwise(straight, tmp_path):
    workdir = tmp_path / "preempted"
    target = random.Random(1).randint(2, 6)  # seeded "random" step
    child = Child(workdir)
    child.wait_for_step(target)
    child.proc.send_signal(signal.SIGTERM)
    code, err = child.finish()
    assert code == 143, err[-2000:]
    match = re.search(
        r"stopped: preempted at step (\d+) by SIGTERM; its checkpoint is committed", err
    )
    assert match, err[-2000:]
    stopped = int(match[1])
    assert target <= stopped < STEPS
    assert stopped in Checkpointer(workdir / "checkpoints", RunConfig()).all_steps()
    assert max(losses(workdir)) == stopped  # the metrics are flushed to the step it stopped at
    assert main([*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]) == 0
    assert_same_run(straight, workdir)


def test_double_ctrl_c_exits_at_once_and_leaves_a_restorable_checkpoint(straight, tmp_path):
    workdir = tmp_path / "interrupted"
    child = Child(workdir)
    child.wait_for_step(4)
    deadline = time.monotonic() + 60
    while not (workdir / "checkpoints" / "3").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)  # a checkpoint to resume from (without one, --restart is required)
    child.proc.send_signal(signal.SIGINT)
    child.proc.send_signal(signal.SIGINT)
    code, err = child.finish()
    assert code == 130, err[-2000:]
    assert main([*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]) == 0
    assert_same_run(straight, workdir)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return (
        shutil.which("mount") is not None
        and subprocess.run(cmd, capture_output=True).returncode == 0
    )


def test_full_disk_stops_the_run_and_it_resumes_once_space_is_freed(
    straight, tmp_path, capsys, monkeypatch
):
    """A real tmpfs as the workdir (CI runs as root); an injected ENOSPC where mounting fails."""
    one_checkpoint = sum(
        p.stat().st_size for p in (straight / "checkpoints" / str(STEPS)).rglob("*") if p.is_file()
    )
    workdir = tmp_path / "small_disk"
    mounted = _mount_tmpfs(workdir, str(int(one_checkpoint * 1.5)))
    try:
        if not mounted:  # fallback: the fourth save fails as a full disk would
            calls = {"n": 0}
            save = Checkpointer.save

            def failing_save(self, *a, **k):
                calls["n"] += 1
                if calls["n"] >= 2:
                    raise OSError(errno.ENOSPC, "No space left on device", str(workdir))
                return save(self, *a, **k)

            monkeypatch.setattr(Checkpointer, "save", failing_save)
        args = [*ARGS, "--workdir", str(workdir), "--steps", str(STEPS)]
        assert main([*args, *small(*KEYS, "run.async_checkpoint=false")]) == 1
        err = capsys.readouterr().err
        assert "no space left on the device writing" in err and "MiB free" in err, err
        assert re.search(r"the last committed checkpoint \(step (3|6|9)\) is intact", err), err
        committed = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
        assert committed and max(committed) < STEPS
        # Space freed: the run resumes from the intact checkpoint and matches the straight run.
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(workdir)], check=True)
        else:
            monkeypatch.setattr(Checkpointer, "save", save)
        assert main([*args, *small(*KEYS, "run.async_checkpoint=false")]) == 0
        assert_same_run(straight, workdir)
    finally:
        if mounted:
            # Lazy: a file still open in this process (an event writer) would keep it busy.
            subprocess.run(["umount", "-l", str(workdir)], check=False)
    print(f"full-disk test ran on {'a real tmpfs' if mounted else 'an injected ENOSPC'}")


@pytest.fixture
def data_copy(tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(ensure_data(None), copy)
    return copy


def _run_on(data: Path, workdir: Path, steps: int) -> int:
    return main(
        [*ARGS, "--workdir", str(workdir), "--steps", str(steps), "--set", f"data.path={data}"]
    )


def test_a_shard_truncated_between_runs_stops_the_resume_naming_it(data_copy, tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _run_on(data_copy, workdir, 6) == 0
    shard = data_copy / "train-00000-of-00004.array_record"
    os.truncate(shard, shard.stat().st_size // 2)
    assert _run_on(data_copy, workdir, STEPS) == 2
    err = capsys.readouterr().err
    assert f"data shard {shard} is unreadable" in err, err
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6]


def test_a_record_corrupted_in_place_stops_the_run_naming_it(data_copy, tmp_path, capsys):
    """Bytes flipped inside the first records' chunks (not the file's index): the run stops
    at the batch that reads one, naming the shard and the record, before training on it."""
    for shard in sorted(data_copy.glob("train-*.array_record")):
        data = bytearray(shard.read_bytes())
        for offset in range(3000, len(data) // 2, 3000):
            data[offset] ^= 0xFF
        shard.write_bytes(bytes(data))
    workdir = tmp_path / "run"
    assert _run_on(data_copy, workdir, STEPS) == 2
    err = capsys.readouterr().err
    assert re.search(r"train-0000\d-of-00004\.array_record record \d+ is unreadable", err), err
    trained = max(losses(workdir), default=0) if (workdir / "metrics.jsonl").exists() else 0
    assert trained < STEPS
    ckpt_dir = workdir / "checkpoints"
    saved = [int(p.name) for p in ckpt_dir.iterdir()] if ckpt_dir.exists() else []
    assert max(saved, default=0) <= trained  # never a checkpoint past the last good step
