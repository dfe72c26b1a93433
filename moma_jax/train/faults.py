"""Faults of real clusters: one run per workdir, preemption (SIGTERM / Ctrl-C), full disks.

- `WorkdirLock`: an `fcntl.flock` on `WORKDIR/.lock`, held for the life of the run and
  recording the holder's pid and host. The OS releases it when the process dies, so a killed run
  never blocks its restart; a second run on the same workdir stops at once, naming the holder,
  and changes nothing. In a multi-process run process 0 holds it (the others write no shared
  file): two jobs launched onto one workdir are refused by their process 0.
- `PreemptionWatch`: single-process runs catch SIGTERM and SIGINT with Python handlers (the
  first asks the loop to stop after the step in flight; a second SIGINT exits at once, status
  130, leaving the committed checkpoints as they are); multi-process runs leave SIGTERM to JAX's
  preemption service and ask `multihost_utils.reached_preemption_sync_point` each step, so every
  host stops at the same step. Never both: a Python SIGTERM handler installed after
  `jax.distributed.initialize` takes the signal and the sync point never fires.
- `Preempted`: raised by the loop after the preemption checkpoint committed; the command exits
  128 + the signal (143 for SIGTERM, 130 for SIGINT).
- `DiskFullError`: a write that failed for lack of space, naming the path and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import IO

import jax

from moma_jax.safe_io import open_nofollow

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


class DiskFullError(RuntimeError):
    """A write failed for lack of space."""


class Preempted(Exception):  # noqa: N818 (a request to stop, not an error)
    """The run stopped at `step` on signal `signum`, its checkpoint committed."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"preempted at step {step} by {signal.Signals(signum).name}")
        self.step, self.signum = step, signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class WorkdirLock:
    """`with WorkdirLock(path):` holds the workdir for one run (see the module docstring)."""

    def __init__(self, workdir: Path, flag: str = "--workdir"):
        self.workdir = Path(workdir)
        self.flag = flag  # the option that names the directory, for the message
        self.path = self.workdir / LOCK_FILE
        self.file: IO[str] | None = None
        self.created_dir = False
        self.before: dict[str, int] | None = None

    def __enter__(self) -> WorkdirLock:
        self.created_dir = not self.workdir.exists()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.before = None if self.path.exists() else self._snapshot()
        for _ in range(10):
            # Never truncates (a refused run changes nothing), never follows a planted symlink.
            file = open_nofollow(self.path, "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                file.close()
                what = "workdir" if self.flag == "--workdir" else self.flag
                raise WorkdirBusyError(
                    f"{what} {self.workdir} is in use by {holder}; wait for that run to end, "
                    f"stop it, or use another {self.flag}"
                ) from None
            if self._is_current(file):
                break
            file.close()  # locked a file a run that wrote nothing had just removed: again
        else:
            raise WorkdirBusyError(f"{self.path} keeps being replaced; is another run starting?")
        file.seek(0)
        file.truncate()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        file.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {stamp})\n")
        file.flush()
        self.file = file
        return self

    def _is_current(self, file: IO[str]) -> bool:
        """The locked file is still the one at the lock's path (not unlinked meanwhile)."""
        try:
            return os.fstat(file.fileno()).st_ino == os.lstat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _snapshot(self) -> dict[str, int]:
        """Top-level entries and their mtimes, the lock file left out."""
        entries = (p for p in self.workdir.iterdir() if p.name != LOCK_FILE)
        return {p.name: p.lstat().st_mtime_ns for p in entries}

    def __exit__(self, *exc: object) -> None:
        assert self.file is not None
        # A run that wrote nothing (refused after the lock was taken) leaves no trace: the lock
        # file it created goes, and so does the directory it created.
        if self.before is not None and self._snapshot() == self.before:
            self.path.unlink(missing_ok=True)
            if self.created_dir:
                with contextlib.suppress(OSError):
                    self.workdir.rmdir()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class PreemptionWatch:
    """`with PreemptionWatch() as watch:` ... `watch.requested(step)` -> signal number or None."""

    def __init__(self) -> None:
        self.multi_process = jax.process_count() > 1
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionWatch:
        if not self.multi_process:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is not None and signum == signal.SIGINT:
            os._exit(130)  # a second Ctrl-C: at once (committed checkpoints are whole on disk)
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"\n{name} received: finishing the step in flight, then saving a checkpoint "
            "(Ctrl-C again to exit at once)",
            flush=True,
        )

    def requested(self, step: int) -> int | None:
        """The signal that asked the run to stop, checked after `step` (every host agrees)."""
        if self.multi_process:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                return int(signal.SIGTERM)
            return None
        return self.signum


def is_disk_full(e: BaseException) -> bool:
    """An OSError for lack of space, possibly wrapped by Orbax."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def disk_full_error(path: Path, e: BaseException, last_step: int | None) -> DiskFullError:
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    kept = (
        f"the last committed checkpoint (step {last_step}) is intact"
        if last_step
        else "no checkpoint was committed yet"
    )
    return DiskFullError(
        f"no space left on the device writing {path} ({free / 2**20:.1f} MiB free): "
        f"{type(e).__name__}: {str(e)[:200]}. The run stopped; {kept}. Free space and rerun "
        "the same command to resume."
    )
