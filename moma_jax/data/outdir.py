"""A dataset directory (`--out`): what in it is ours, one writer at a time, and writes that never
follow a planted link.

`--force` and a restarted preparation remove only what a preparation wrote, never a user's file
and never an input. "Ours" is decided per entry, strictly:

- `prepare_state.json` and `manifest.json` when they are regular files holding our JSON (a
  user's own `manifest.json` is not ours); a directory holding either is a *preparation*;
- in a preparation: the tokenizer files (fixed names, or a SentencePiece `.model` its JSON
  names, as earlier versions copied it under the user's name), the shards
  (`train-000003-001.array_record`, the bundle's `train-00000-of-00004.array_record`) and
  `chunks/` holding only `000003.json` commits;
- anywhere: the lock file and our temporary files (`.NAME.XXXXXXXX.tmp`, NAME one of the above).

Anything else (another name, a symbolic link, a FIFO, a sub-directory) is foreign, and a
directory holding anything foreign is refused, even with `--force`. Every fixed-name file is
written to a fresh `mkstemp` file (created with O_EXCL, so never through a planted link) and
renamed into place (a rename replaces a link itself, never its target); the lock is opened with
O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STATE = "prepare_state.json"
CHUNKS = "chunks"
TOKENIZERS = "tokenizers.json"  # which text tokenizer the shards were written with
TOKENIZER_FILE = "image_tokenizer.npz"
LOCK = ".moma_jax-prepare.lock"
_TOKENIZER_NAMES = {TOKENIZERS, TOKENIZER_FILE, "tokenizer.json", "tokenizer.model"}
_SHARD = re.compile(r"(?:train|heldout)-(?:(\d{6})-\d{3}|\d{5}-of-\d{5})\.array_record")
_CHUNK = re.compile(r"(\d{6})\.json")
# mkstemp's names (`.NAME.` + 8 of [a-z0-9_] + `.tmp`), and `NAME.tmp` of earlier versions.
_TMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp|(.+)\.tmp")
_SHOWN = 5  # foreign names quoted in a refusal


def check_target(out: Path, inputs: list[Path]) -> None:
    """Refuse an `--out` that is a file, or that overlaps an input, before anything is written."""
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--out {out} is a symbolic link to nothing. Choose a directory.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory. Choose a new or empty --out.")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a directory.")
            break
    real_out = out.resolve()
    for path in inputs:
        real = path.resolve()
        if real == real_out or real.is_relative_to(real_out):
            raise ValueError(
                f"The input {path} lies inside --out {out}; a preparation there could remove "
                "it. Choose an --out outside your inputs."
            )
        if real_out.is_relative_to(real):
            raise ValueError(
                f"--out {out} lies inside the input {path}, which would read what it writes. "
                "Choose an --out outside your inputs."
            )


def foreign_files(out: Path) -> list[str]:
    """What in `out` no preparation wrote (names relative to `out`, sorted); [] if absent."""
    if not out.is_dir():
        return []
    state_ok = _ours_json(out / STATE, ("options", "files"))
    manifest_ok = _ours_json(out / MANIFEST, ("format_version", "splits"))
    prepared = state_ok or manifest_ok
    listed = _listed_files(out) if prepared else set()
    foreign = []
    with os.scandir(out) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            if e.name == CHUNKS and e.is_dir(follow_symlinks=False):
                foreign += [f"{CHUNKS}/{n}" for n in _foreign_chunks(out / CHUNKS, prepared)]
                continue
            name = _untmp(e.name)
            if name == STATE:
                ours = state_ok or name != e.name
            elif name == MANIFEST:
                ours = manifest_ok or name != e.name
            else:
                ours = (
                    name == LOCK
                    or prepared
                    and (name in _TOKENIZER_NAMES or name in listed or bool(_SHARD.fullmatch(name)))
                )
            if not (ours and e.is_file(follow_symlinks=False)) and _exists(out / e.name):
                foreign.append(e.name)
    return foreign


def refuse_foreign(out: Path) -> None:
    """ValueError naming a few files in `out` that no preparation wrote, if there are any."""
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (", ..." if len(foreign) > _SHOWN else "")
        raise ValueError(
            f"--out {out} holds {len(foreign)} file{'s' if len(foreign) > 1 else ''} that "
            "prepare_data.py did not write "
            f"({shown}); refusing to overwrite or remove them, even with --force. Choose a new "
            "or empty --out."
        )


def remove_ours(out: Path, *, keep_lock: bool = True) -> None:
    """Remove what a preparation wrote in `out`, and nothing else: the manifest first (no
    finished dataset misses a shard), the state last (until then the rest is still known to be
    ours). Callers refuse a directory with foreign files first; this skips them regardless."""
    foreign = set(foreign_files(out))
    keep = foreign | ({LOCK} if keep_lock else set())
    for name in sorted(os.listdir(out), key=lambda n: (n != MANIFEST, n == STATE)):
        if name == CHUNKS and name not in keep:
            for chunk in os.listdir(out / CHUNKS):
                if f"{CHUNKS}/{chunk}" not in foreign:
                    (out / CHUNKS / chunk).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a foreign file in it stays, and so does it
                (out / CHUNKS).rmdir()
        elif name not in keep:
            (out / name).unlink(missing_ok=True)


def is_temp(name: str) -> bool:
    """A temporary file of ours (left by a killed preparation)."""
    return _untmp(name) != name


def shard_chunk(name: str) -> int | None:
    """The chunk a user corpus shard belongs to (`train-000003-001.array_record` -> 3)."""
    m = _SHARD.fullmatch(name)
    return int(m[1]) if m and m[1] else None


def chunk_number(name: str) -> int | None:
    """The chunk a commit file names (`000003.json` -> 3)."""
    m = _CHUNK.fullmatch(name)
    return int(m[1]) if m else None


class Replacement:
    """A fresh temporary file beside `path` to write (`.tmp`); `commit` renames it over `path`,
    `discard` removes it. mkstemp creates it with O_EXCL: never through a planted link."""

    def __init__(self, path: Path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o644)  # mkstemp makes it private; a dataset is an ordinary readable file
        os.close(fd)
        self.path, self.tmp = path, Path(tmp)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A `Replacement` of `path` as a block: committed when it ends, discarded if it raises."""
    replacement = Replacement(path)
    try:
        yield replacement.tmp
        replacement.commit()
    except BaseException:
        replacement.discard()
        raise


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON at `path`, atomically and without following a link there."""
    with replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in `path`, None if it is absent, not a regular file or not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with open(fd, "rb") as f:
        if not _is_regular(f.fileno()):
            return None
        try:
            return json.loads(f.read())
        except (ValueError, RecursionError):
            return None


@contextlib.contextmanager
def locked(out: Path) -> Iterator[bool]:
    """Hold `out`'s lock (flock on a file in it) for the block; a second preparation of `out`
    is refused at once, naming the holder. The lock goes with the process, however it ends.

    Yields whether `out` is writable. On a read-only file system the lock file cannot be
    created: an existing one is locked through a read-only descriptor (flock needs no write
    access, so a writer of the same directory through a writable mount still excludes us), and
    the block gets False: it may only read."""
    path = out / LOCK
    fd = _open_lock(path)
    writable = fd is not None
    if fd is None:  # a read-only file system
        with contextlib.suppress(FileNotFoundError):  # none: no preparation ever wrote here
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if fd is None:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ValueError(
                f"--out {out} is being prepared by another prepare_data.py ({holder}); wait "
                "for it to finish, or choose another --out."
            ) from None
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        yield writable
    finally:
        os.close(fd)


def _open_lock(path: Path) -> int | None:
    """The lock file opened for writing (created if absent); None on a read-only file system."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(
                f"{path} is a symbolic link; remove it, or choose another --out."
            ) from None
        if e.errno == errno.EROFS:
            return None
        raise


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """ArrayRecord's writer reports a failed write as a RuntimeError quoting the system's
    message: a full or read-only disk is turned into the OSError it is (naming `path`)."""
    try:
        yield
    except RuntimeError as e:
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            if os.strerror(code) in str(e):
                raise OSError(code, os.strerror(code), str(path)) from e
        raise


def _untmp(name: str) -> str:
    """The name a temporary file of ours stands for (`name` itself if it is not one)."""
    m = _TMP.fullmatch(name)
    return (m[1] or m[2]) if m else name


def _exists(path: Path) -> bool:
    """False for a file removed since it was listed (by the preparation that holds the lock)."""
    return os.path.lexists(path)


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _ours_json(path: Path, keys: tuple[str, ...]) -> bool:
    data = read_json(path)
    return isinstance(data, dict) and all(k in data for k in keys)


def _listed_files(out: Path) -> set[str]:
    """SentencePiece files that our JSON names (plain `.model` names only, never a path)."""
    names = set()
    for path, keys in (
        (out / TOKENIZERS, ("text",)),
        (out / MANIFEST, ("text_tokenizer", "image_tokenizer")),
    ):
        data = read_json(path)
        for key in keys:
            entry = data.get(key) if isinstance(data, dict) else None
            name = entry.get("file") if isinstance(entry, dict) else None
            if isinstance(name, str) and name == Path(name).name and name.endswith(".model"):
                names.add(name)
    return names


def _foreign_chunks(chunks: Path, prepared: bool) -> list[str]:
    foreign = []
    with os.scandir(chunks) as entries:
        for e in sorted(entries, key=lambda e: e.name):
            ours = prepared and chunk_number(_untmp(e.name)) is not None
            if not (ours and e.is_file(follow_symlinks=False)) and _exists(chunks / e.name):
                foreign.append(e.name)
    return foreign
