"""`prepare_data.py` as a running process with worker processes: Ctrl-C exits 130 with one line,
a killed worker or a bad record met in a worker fails in one line (never a wait), a second
preparation of one --out is refused at once; each stopped run resumes to the dataset an
uninterrupted preparation gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from file_tree import picture

from moma_jax.commands.prepare_data import main
from moma_jax.data import corpus_chunks, outdir

REPO = Path(__file__).resolve().parents[1]


def _big_corpus(path: Path, megabytes: float) -> Path:
    """Many chunks with --max-memory 1MB (32 kB each): a run lasts a few seconds."""
    line = json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 25})[:-2]
    n = int(megabytes * 1e6 / (len(line) + 12))
    path.write_text("".join(f'{line} {i}"}}\n' for i in range(n)))
    return path


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A corpus of ~300 chunks and its uninterrupted preparation."""
    root = tmp_path_factory.mktemp("big")
    src = _big_corpus(root / "big.jsonl", 10)
    args = ["--input", str(src), "--max-memory", "1MB", "--quiet"]
    assert main([*args, "--out", str(root / "straight"), "--workers", "1"]) == 0
    return args, root / "straight"


def _start(args: list[str], out: Path, workers: int) -> subprocess.Popen:
    """scripts/prepare_data.py in its own session (a terminal's Ctrl-C reaches its whole
    process group), once it has committed a few chunks."""
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), *args, "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--workers", str(workers)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while len(list((out / "chunks").glob("*.json"))) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    return proc


def _same_dataset(out: Path, straight: Path) -> None:
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (out, straight)]
    for m in manifests:
        m.pop("prepare_seconds")
    assert manifests[0] == manifests[1]
    shards = sorted(p.name for p in straight.glob("*.array_record"))
    assert sorted(p.name for p in out.glob("*.array_record")) == shards
    assert all((out / s).read_bytes() == (straight / s).read_bytes() for s in shards)
    assert not [p for p in out.rglob("*") if outdir.is_temp(p.name)]


def test_ctrl_c_exits_130_with_one_line_and_the_rerun_resumes(big, tmp_path):
    args, straight = big
    out = tmp_path / "data"
    proc = _start(args, out, workers=2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "interrupted; rerun the same command to resume\n"
    assert not (out / "manifest.json").exists()
    committed = {p: p.stat().st_mtime_ns for p in (out / "chunks").glob("*.json")}
    assert len(committed) >= 3
    assert main([*args, "--out", str(out), "--workers", "1"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in committed.items())  # kept, not redone
    _same_dataset(out, straight)


class _Interrupted:
    """An executor whose submit meets a Ctrl-C (the signal raised in the submitting thread)."""

    def submit(self, fn, task):
        signal.raise_signal(signal.SIGINT)
        return task


def test_a_ctrl_c_while_a_chunk_is_submitted_is_not_lost():
    """Submitting may start a worker, which must not inherit a Ctrl-C handler; a Ctrl-C that
    arrives in that window still interrupts the preparation (CI once saw it ignored: exit 0)."""
    workers = object.__new__(corpus_chunks._Workers)
    workers.executor = _Interrupted()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        workers.submit((0, 0, []))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def _workers_of(pid: int) -> list[int]:
    """The pool's worker processes of `pid` (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    cmdlines = {int(c): Path(f"/proc/{c}/cmdline").read_bytes() for c in children}
    return [c for c, line in cmdlines.items() if b"spawn_main" in line]


def test_a_killed_worker_fails_in_one_line_and_the_rerun_resumes(big, tmp_path):
    """A worker killed (out of memory, by a user) is an error, never a preparation that waits
    forever for its chunk."""
    args, straight = big
    out = tmp_path / "data"
    proc = _start(args, out, workers=2)
    os.kill(_workers_of(proc.pid)[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("error: a worker process of the preparation died"), stderr
    assert not (out / "manifest.json").exists()
    committed = {p: p.stat().st_mtime_ns for p in (out / "chunks").glob("*.json")}
    assert main([*args, "--out", str(out), "--workers", "2"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in committed.items())  # kept, not redone
    _same_dataset(out, straight)


def test_a_bad_record_in_a_worker_fails_while_the_other_worker_idles(tmp_path):
    """Chunk 0 (text) finishes and its worker idles while chunk 1's worker meets a truncated
    image: the error is one line, at once, and the pool closes."""
    png = picture(tmp_path / "corpus" / "cut.png")
    src = _big_corpus(tmp_path / "corpus" / "docs.jsonl", 0.03)
    png.write_bytes(png.read_bytes()[:40])
    with src.open("a") as f:
        f.write(json.dumps({"items": [{"text": "a cut image"}, {"image": "cut.png"}]}) + "\n")
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--input", str(src)]
    cmd += ["--out", str(tmp_path / "data"), "--max-memory", "1MB", "--workers", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cut.png" in done.stderr, done.stderr
    assert done.stderr.startswith("error: bad record "), done.stderr
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_a_second_prepare_of_one_out_is_refused_at_once(big, tmp_path, capsys):
    args, straight = big
    out = tmp_path / "data"
    proc = _start(args, out, workers=1)
    try:
        for extra in ([], ["--force", "--seed", "1"]):
            capsys.readouterr()
            started = time.time()
            assert main([*args, "--out", str(out), "--workers", "1", *extra]) == 2
            err = capsys.readouterr().err
            assert f"is being prepared by another prepare_data.py (pid {proc.pid})" in err
            assert time.time() - started < 5
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 130  # undisturbed until Ctrl-C
    assert main([*args, "--out", str(out), "--workers", "1"]) == 0
    _same_dataset(out, straight)
