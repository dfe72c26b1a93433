"""Writing fixed-name files into a directory someone else may have prepared (a shared or
downloaded run directory, a dataset folder) without following a planted symlink.

- `write_atomic`: a temporary file made by `tempfile` in the same directory (a fresh name,
  created with O_EXCL, so never an existing file or link), then `os.replace` onto the name: a
  symlink there is replaced itself, its target is never opened; a reader sees the old or the new
  file, never half of one.
- `open_nofollow`: opens a fixed name for appending or locking with O_NOFOLLOW; a symlink there
  is a `SymlinkRefusedError` naming it.

The directory itself may be a symlink (`runs -> /data/runs`): only the last component is
checked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO


class SymlinkRefusedError(ValueError):
    """A fixed-name file of ours is a symlink: writing it would write its target."""

    def __init__(self, path: Path):
        super().__init__(
            f"{path} is a symbolic link (to {os.readlink(path)}); moma_jax never writes through "
            "one. Replace it with a regular file (or remove it), or use another directory."
        )


def refuse_symlink(path: Path) -> None:
    if Path(path).is_symlink():
        raise SymlinkRefusedError(Path(path))


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` atomically, never through a symlink at `path`."""
    write_atomic_bytes(path, text.encode())


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` atomically, never through a symlink at `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_nofollow(path: Path, mode: str) -> IO[str]:
    """`open(path, mode)` for "a" or "a+", refusing a symlink at `path` (O_NOFOLLOW)."""
    flags = {"a": os.O_WRONLY, "a+": os.O_RDWR}[mode] | os.O_APPEND | os.O_CREAT
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if Path(path).is_symlink():
            raise SymlinkRefusedError(Path(path)) from None
        raise e
    return os.fdopen(fd, mode)
