"""`prepare_data.py` on a read-only and on a full disk, real ones: a bind mount remounted
read-only, a small tmpfs (CI runs as root). A failure is one `error: ...` line naming --out and
the fix, exit 2, nothing outside --out changed and no manifest.json; a finished dataset on a
read-only disk is read, not rewritten (exit 0); once space is freed the same command finishes
the dataset that an uninterrupted preparation gives.

Where mounting is refused, each case reruns in a user and mount namespace (`unshare -rm`, a
subprocess), and where that is refused too the errors are injected (EROFS, ENOSPC); never
skipped. MOMA_JAX_DISKS=mount|unshare|inject forces one way.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from file_tree import snapshot

from moma_jax.commands.prepare_data import main
from moma_jax.data import corpus_chunks, ensure_data, outdir
from moma_jax.data.outdir import LOCK, MANIFEST

REPO = Path(__file__).resolve().parents[1]
bundled = importlib.import_module("moma_jax.data.prepare")  # the module, not its function
FIX_RO = "Choose an --out on a writable disk, or remount it read-write, and rerun.\n"
FIX_FULL = "Free space and rerun the same command to {}, or choose an --out on a bigger disk.\n"


# --- The disks: mounted, or the errors injected -----------------------------------------------


def _sh(*cmd: object) -> bool:
    return subprocess.run(list(map(str, cmd)), capture_output=True).returncode == 0


class MountedDisks:
    """Real file systems (root, or root of a user namespace)."""

    processes = True  # worker processes see the mounts too

    @contextlib.contextmanager
    def read_only(self, path: Path) -> Iterator[None]:
        assert _sh("mount", "--bind", path, path)
        try:
            assert _sh("mount", "-o", "remount,ro,bind", path)
            yield
        finally:
            _sh("umount", path) or _sh("umount", "-l", path)

    @contextlib.contextmanager
    def small(self, path: Path, kib: int) -> Iterator[Callable[[int], None]]:
        """A tmpfs of `kib` KiB at `path`; yields a function that resizes it."""
        path.mkdir(parents=True, exist_ok=True)
        assert _sh("mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", path)
        try:
            yield lambda kib: _assert(_sh("mount", "-o", f"remount,size={kib}k", path))
        finally:
            _sh("umount", path) or _sh("umount", "-l", path)


class InjectedDisks:
    """The last resort: the errors the kernel gives, raised by patched functions (in this
    process only: worker processes would not see them)."""

    processes = False

    @contextlib.contextmanager
    def read_only(self, path: Path) -> Iterator[None]:
        def under(p: str | os.PathLike) -> bool:
            return Path(os.path.abspath(p)).is_relative_to(path)

        def new(p: str | os.PathLike, *args: object) -> bool:
            return os.path.isdir(os.path.dirname(p)) and not os.path.lexists(p)

        def refuse(real: Callable, when: Callable[..., bool]) -> Callable:
            def patched(p, *args, **kwargs):
                if under(p) and when(p, *args):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))
                return real(p, *args, **kwargs)

            return patched

        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch("os.open", refuse(os.open, lambda p, f, *a: f & writes)))
            stack.enter_context(mock.patch("os.mkdir", refuse(os.mkdir, new)))
            for name in ("unlink", "rmdir", "rename", "replace"):
                stack.enter_context(mock.patch(f"os.{name}", refuse(getattr(os, name), bool)))
            yield

    @contextlib.contextmanager
    def small(self, path: Path, kib: int) -> Iterator[Callable[[int], None]]:
        """ArrayRecord's writers fail as on a full disk once `path` would hold `kib` KiB."""
        path.mkdir(parents=True, exist_ok=True)
        quota = [kib << 10]
        real = corpus_chunks.ArrayRecordWriter

        class Writer:
            def __init__(self, file: str, options: str):
                self.file, self.inner = file, real(file, options)
                self.room = quota[0] - sum(_sizes(path).values())

            def write(self, record: bytes) -> None:
                self.room -= len(record)
                if self.room < 0:
                    raise RuntimeError(f"write() failed: No space left on device; writing {self}")
                self.inner.write(record)

            def close(self) -> None:
                self.inner.close()

        with (
            mock.patch.object(corpus_chunks, "ArrayRecordWriter", Writer),
            mock.patch.object(bundled, "ArrayRecordWriter", Writer),
        ):
            yield lambda kib: quota.__setitem__(0, kib << 10)


def _assert(ok: bool) -> None:
    assert ok


@functools.cache
def _way() -> str:
    """mount, unshare (mount in a user and mount namespace) or inject: the first that works."""
    if os.environ.get("MOMA_JAX_DISKS"):
        return os.environ["MOMA_JAX_DISKS"]
    with tempfile.TemporaryDirectory() as d:
        tries = f"mount -t tmpfs tmpfs {d} && mount --bind {d} {d} && mount -o remount,ro,bind {d}"
        if _sh("sh", "-c", f"{tries} && umount {d} && umount {d}"):
            return "mount"
        if shutil.which("unshare") and _sh("unshare", "-rm", "sh", "-c", tries):
            return "unshare"
    return "inject"


def run_case(case: Callable, root: Path, **params: object) -> None:
    """`case(root, disks, **params)` on real file systems where it can."""
    way = _way()
    if way == "unshare":
        cmd = [sys.executable, __file__, case.__name__, str(root), json.dumps(params)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "MOMA_JAX_DISKS": "mount"}
        done = subprocess.run(["unshare", "-rm", *cmd], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        case(root, MountedDisks() if way == "mount" else InjectedDisks(), **params)
    print(f"{case.__name__}{params} ran on {way}")


# --- The cases -----------------------------------------------------------------------------


def _prepare(*args: object) -> tuple[int, str]:
    """main(args): (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(map(str, args)))
    return rc, err.getvalue()


def _corpus(path: Path, megabytes: float) -> Path:
    """About 32 chunks a MB with --max-memory 2MB."""
    line = json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 25})[:-2]
    n = int(megabytes * 1e6 / (len(line) + 12))
    path.write_text("".join(f'{line} {i}"}}\n' for i in range(n)))
    return path


def _sizes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _same_splits(out: Path, straight: Path) -> None:
    """The splits of an uninterrupted preparation, and its shards byte for byte."""
    splits = [json.loads((d / MANIFEST).read_text())["splits"] for d in (out, straight)]
    assert splits[0] == splits[1]
    shards = [s for split in splits[1].values() for s in split["shards"]]
    assert all((out / s).read_bytes() == (straight / s).read_bytes() for s in shards)
    assert not [p for p in out.rglob("*") if outdir.is_temp(p.name)]


def read_only_case(root: Path, disks: MountedDisks, out_is: str, extra: list[str]) -> None:
    """--out on a read-only disk: refused with one line, or a finished dataset read as is."""
    disk = root / "disk"
    out = disk / "new" / "data" if out_is == "new dir" else disk / "data"
    args = ["--input", _corpus(root / "docs.jsonl", 0.1), "--quiet", "--workers", "1"]
    if out_is.startswith("bundled"):
        args = []
    (out if out_is != "new dir" else disk).mkdir(parents=True)
    if out_is == "bundled, finished":
        shutil.copytree(ensure_data(None), out, dirs_exist_ok=True)
    elif out_is.startswith("finished"):
        assert _prepare(*args, "--out", out)[0] == 0
        if out_is == "finished, no lock file":  # copied without its hidden files
            (out / LOCK).unlink()
    before = snapshot(root)
    with disks.read_only(disk):
        rc, err = _prepare(*args, *extra, "--out", out)
    assert snapshot(root) == before, err  # nothing written, not even the lock file
    if out_is.endswith("finished") and not extra or out_is == "finished, no lock file":
        assert (rc, err) == (0, "")
    elif extra == ["--seed", "1"]:
        assert rc == 2 and err.startswith(f"error: {out} already holds a dataset "), err
    else:
        failed = {"new dir": f"; writing {disk / 'new'} failed", "bundled, empty dir": "; writing "}
        head = f"error: --out {out} is on a read-only file system{failed.get(out_is, '')}"
        assert rc == 2 and err.startswith(head) and err.endswith(f". {FIX_RO}"), err
        assert err.count("\n") == 1


@pytest.mark.parametrize(
    "out_is, extra",
    [
        ("empty dir", []),
        ("new dir", []),
        ("finished", []),
        ("finished, no lock file", []),
        ("finished", ["--seed", "1"]),
        ("finished", ["--force"]),
        ("bundled, empty dir", []),
        ("bundled, finished", []),
    ],
)
def test_a_read_only_out_is_refused_in_one_line_or_read_as_is(tmp_path, out_is, extra):
    run_case(read_only_case, tmp_path, out_is=out_is, extra=extra)


def full_disk_case(root: Path, disks: MountedDisks, workers: int) -> None:
    """A disk that fills mid-way: one line, committed chunks kept, resumed once space is freed."""
    workers = workers if disks.processes else 1
    args = ["--input", _corpus(root / "docs.jsonl", 2), "--max-memory", "2MB", "--quiet"]
    straight = root / "straight"
    assert _prepare(*args, "--workers", workers, "--out", straight)[0] == 0
    size = sum(_sizes(straight).values())
    disk, out = root / "disk", root / "disk" / "data"
    with disks.small(disk, size // 2 >> 10) as resize:
        before = snapshot(root, exclude=(out,))
        rc, err = _prepare(*args, "--workers", workers, "--out", out)
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: no space left on the device of --out {out} ("), err
        assert err.endswith(FIX_FULL.format("resume from the chunks already written")), err
        assert snapshot(root, exclude=(out,)) == before
        assert not (out / MANIFEST).exists()
        assert not [p for p in out.rglob("*") if outdir.is_temp(p.name)]  # no half chunk
        committed = {p: p.stat().st_mtime_ns for p in (out / "chunks").glob("*.json")}
        assert 0 < len(committed) < len(list((straight / "chunks").glob("*.json")))

        resize(2 * size >> 10)
        assert _prepare(*args, "--workers", workers, "--out", out)[0] == 0
        assert all(p.stat().st_mtime_ns == t for p, t in committed.items())  # kept, not redone
        _same_splits(out, straight)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_stops_in_one_line_and_the_rerun_resumes(tmp_path, workers):
    run_case(full_disk_case, tmp_path, workers=workers)


def bundled_full_disk_case(root: Path, disks: MountedDisks) -> None:
    """The bundled dataset, built beside --out and renamed into place: nothing is left."""
    straight = ensure_data(None)
    disk, out = root / "disk", root / "disk" / "data"
    with disks.small(disk, sum(_sizes(straight).values()) // 2 >> 10) as resize:
        before = snapshot(root)
        rc, err = _prepare("--out", out)
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: no space left on the device of --out {out} ("), err
        assert err.endswith(FIX_FULL.format("prepare it again")), err
        assert snapshot(root) == before  # not even its temporary directory
        resize(4 * sum(_sizes(straight).values()) >> 10)
        assert _prepare("--out", out)[0] == 0
        _same_splits(out, straight)


def test_the_bundled_dataset_on_a_full_disk(tmp_path):
    run_case(bundled_full_disk_case, tmp_path)


if __name__ == "__main__":  # run_case in a namespace: CASE ROOT PARAMS
    globals()[sys.argv[1]](Path(sys.argv[2]), MountedDisks(), **json.loads(sys.argv[3]))
