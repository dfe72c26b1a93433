"""Snapshots of a directory tree (links not followed), to show that a command changed nothing,
and hostile files for the preparation tests."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


def snapshot(root: Path, exclude: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under `root` but `exclude`: a file's bytes (hashed) and mtime, a link's
    target, a directory, or another kind by its mode. A FIFO is never opened."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):  # never into a linked directory
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            if any(path == e or path.is_relative_to(e) for e in exclude):
                continue
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path)] = ("file", digest, st.st_mtime_ns)
            elif stat.S_ISLNK(st.st_mode):
                out[str(path)] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[str(path)] = ("dir",)
            else:
                out[str(path)] = ("other", stat.S_IFMT(st.st_mode))
    return out


def png_header(path: Path, width: int, height: int, rows: int = 0) -> None:
    """A grey PNG declaring width x height, with the first `rows` rows of (black) pixels: with
    all of them a real decompression bomb (a few kB that decode to width * height bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    deflate = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte, then the pixels
    data = b"".join(deflate.compress(row) for _ in range(rows)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


class Hung(BaseException):
    """A block ran past its deadline (a BaseException: no `except Exception` swallows it)."""


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise Hung if the block runs longer than `seconds` (even blocked in open() on a FIFO):
    a test fails instead of hanging the suite."""

    def alarm(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def picture(path: Path, seed: int = 0) -> Path:
    """A small random RGB PNG at `path` (its folders made)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(path)
    return path
