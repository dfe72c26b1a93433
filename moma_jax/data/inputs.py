"""Users' corpora as a stream of raw records, read lazily and in a fixed order.

Inputs (`scripts/prepare_data.py --input PATH ...`, any mix, in the order given):

- `*.jsonl`: one document per line, `{"text": "..."}` or `{"items": [{"text": ...},
  {"image": "relative/path.png"}, {"image_codes": [...]}, ...]}`. Image paths are relative to the
  JSONL file; a URL is a bad record (nothing is downloaded).
- a directory: every image in it (sorted, recursively) with its caption in `name.txt` beside it
  (an image without one is a bad record).
- `*.csv`: rows `path,caption` (a header row `path,caption` is skipped); paths relative to the CSV.
- any other file: plain UTF-8 text, cut at blank lines into documents of at most
  `max_doc_bytes` (paragraphs joined; an over-long paragraph is cut at a line end).

`scan` yields `Raw` records (the bytes as read, with file and line) and never holds more than one
document, nor more than `max_record_bytes` of a line, however long; `parse` turns one into a
document's items, or raises `BadRecordError` naming the file and line. Parsing is the expensive
half and runs in the worker processes.

Hostile inputs are bad records, never a hang or a read outside the data: an image path (or a
folder's image or caption) must resolve inside the folder of the file that names it (the folder
given as --input) unless `allow_outside_paths`; only regular files are opened (a FIFO would
block forever, a device may have side effects on open).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class BadRecordError(ValueError):
    """A record that cannot become a document; names the file, the line and the problem."""

    def __init__(self, source: str, line: int, problem: str):
        super().__init__(f"{source}:{line}: {problem}" if line else f"{source}: {problem}")
        self.source, self.line, self.problem = source, line, problem

    def __reduce__(self):  # raised in a worker process, re-raised in the main one
        return (BadRecordError, (self.source, self.line, self.problem))


@dataclasses.dataclass(frozen=True)
class Raw:
    """One record as read: `kind` is jsonl, text, image, csv or oversize; `payload` its bytes
    (jsonl, text, csv), (image path, caption path, folder) for images, or the byte limit a
    line went over (oversize: the line itself was never held)."""

    kind: str
    source: str
    line: int
    payload: Any
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Rules:
    """What `parse` accepts beyond the format (from `corpus_options.Options.rules`)."""

    external_codes: bool = False  # image_codes instead of image files
    allow_outside_paths: bool = False  # image paths may resolve outside the naming file's folder
    max_record_bytes: int = 32 << 20  # a longer line or caption is a bad record


# An item of a document: ("text", str) | ("image", Path) | ("image_codes", int array).
Item = tuple[str, Any]


def check_input(path: Path) -> None:
    """An --input must be a regular file or a folder (never opened otherwise: a FIFO hangs)."""
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist.")
    if not (path.is_dir() or path.is_file()):
        raise ValueError(
            f"--input {path} is {describe(path.stat().st_mode)}, not a file or folder."
        )


def regular_file(path: Path, source: str, line: int, what: str) -> int:
    """The size of `path` if it is a regular file (links followed); BadRecordError otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadRecordError(source, line, f"{what} {path} does not exist") from None
    except (OSError, ValueError) as e:  # a NUL in the name is a ValueError
        raise BadRecordError(source, line, f"{what} {path} cannot be read ({e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadRecordError(
            source, line, f"{what} {path} is {describe(st.st_mode)}, not a regular file"
        )
    return st.st_size


def describe(mode: int) -> str:
    """'a FIFO', 'a directory', ... for a file mode."""
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "a regular file")


def scan(paths: list[Path], max_doc_bytes: int, max_record_bytes: int) -> Iterator[Raw]:
    """Every record of every input, in input order (file order, then line order)."""
    for path in paths:
        check_input(path)
        if path.is_dir():
            yield from _scan_image_dir(path)
        elif path.suffix == ".jsonl":
            yield from _scan_lines(path, "jsonl", max_record_bytes)
        elif path.suffix == ".csv":
            yield from _scan_lines(path, "csv", max_record_bytes)
        else:
            yield from _scan_text(path, max_doc_bytes)


def input_files(paths: list[Path]) -> list[Path]:
    """The files the inputs read (captions included): what a resumed run checks is unchanged."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
    return files


def _lines(f: Any, limit: int) -> Iterator[tuple[bytes, int]]:
    """(the first `limit` bytes, the full length) of each line: a 1 GB line is never held."""
    while head := f.readline(limit):
        n = len(head)
        if not head.endswith(b"\n"):  # cut at `limit` (or the file's last line): skip the rest
            while rest := f.readline(1 << 16):
                n += len(rest)
                if rest.endswith(b"\n"):
                    break
        yield head, n


def _scan_lines(path: Path, kind: str, max_record_bytes: int) -> Iterator[Raw]:
    """JSONL or CSV: a record per non-blank line (not the CSV's header `path,caption`)."""
    with open(path, "rb") as f:
        for number, (line, n) in enumerate(_lines(f, max_record_bytes), start=1):
            if n > max_record_bytes:
                yield Raw("oversize", str(path), number, max_record_bytes, n)
            elif line.strip() and not (
                kind == "csv" and number == 1 and line.strip().lower() == b"path,caption"
            ):
                yield Raw(kind, str(path), number, line, n)


def _scan_text(path: Path, max_doc_bytes: int) -> Iterator[Raw]:
    """Paragraphs (blank-line separated) joined up to max_doc_bytes; streamed line by line."""
    chunk: list[bytes] = []
    size, start = 0, 1
    with open(path, "rb") as f:
        for number, (line, n) in enumerate(_lines(f, max_doc_bytes), start=1):
            if not line.strip():
                if chunk and size >= max_doc_bytes // 2:
                    yield Raw("text", str(path), start, b"".join(chunk).strip(), size)
                    chunk, size = [], 0
                elif chunk:
                    chunk.append(b"\n")
                    size += 1
                continue
            if chunk and size + n > max_doc_bytes:
                yield Raw("text", str(path), start, b"".join(chunk).strip(), size)
                chunk, size = [], 0
            if not chunk:
                start = number
            chunk.append(line)  # a single over-long line is cut (at max_doc_bytes)
            size += len(line)
    if chunk:
        yield Raw("text", str(path), start, b"".join(chunk).strip(), size)


def _scan_image_dir(path: Path) -> Iterator[Raw]:
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for image in images:
        try:
            size = image.stat().st_size
        except OSError:  # a dangling link: parse reports it
            size = 0
        yield Raw("image", str(image), 0, (image, image.with_suffix(".txt"), path), size)


def parse(raw: Raw, rules: Rules) -> list[Item]:
    """The items of one raw record (BadRecordError naming its file and line otherwise)."""
    if raw.kind == "oversize":
        raise BadRecordError(
            raw.source,
            raw.line,
            f"the line is {raw.nbytes} bytes, over the {raw.payload} bytes a record may have "
            "(1/16 of --max-memory); split the document, or raise --max-memory",
        )
    if raw.kind == "text":
        return [("text", _utf8(raw.payload, raw))]
    if raw.kind == "image":
        image, caption_path, folder = raw.payload
        _inside(image, folder, raw, rules, "image")
        if not caption_path.exists():
            raise BadRecordError(
                raw.source, raw.line, f"no caption file {caption_path.name} beside it"
            )
        _inside(caption_path, folder, raw, rules, "caption")
        size = regular_file(caption_path, raw.source, raw.line, "caption")
        if size > rules.max_record_bytes:
            raise BadRecordError(
                raw.source,
                raw.line,
                f"caption {caption_path.name} is {size} bytes, over the {rules.max_record_bytes} "
                "a record may have (1/16 of --max-memory); shorten it, or raise --max-memory",
            )
        with open(caption_path, "rb") as f:  # a regular file: opening cannot block
            caption = _utf8(f.read(rules.max_record_bytes), raw).strip()
        return [("image", image), ("text", caption)] if caption else [("image", image)]
    if raw.kind == "csv":
        try:
            row = next(csv.reader(io.StringIO(_utf8(raw.payload, raw))), [])
        except csv.Error as e:
            raise BadRecordError(raw.source, raw.line, f"not a CSV row ({e})") from None
        if len(row) != 2:
            raise BadRecordError(
                raw.source, raw.line, f"expected 2 columns path,caption, got {row!r:.80}"
            )
        image = _image_path(row[0], Path(raw.source).parent, raw, rules)
        return [("image", image), ("text", row[1])]
    return _parse_jsonl(raw, rules)


def _utf8(data: bytes, raw: Raw) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(raw.source, raw.line, f"invalid UTF-8 at byte {e.start}") from None


def _image_path(name: str, base: Path, raw: Raw, rules: Rules) -> Path:
    if "://" in name:
        raise BadRecordError(
            raw.source, raw.line, f"image {name!r} is a URL; download it and give a local path"
        )
    if "\x00" in name or not name.strip():
        raise BadRecordError(raw.source, raw.line, f"image path {name!r:.80} is not a file name")
    path = base / name
    _inside(path, base, raw, rules, "image")
    return path


def _inside(path: Path, folder: Path, raw: Raw, rules: Rules, what: str) -> None:
    """Refuse `path` unless it resolves (links followed) inside `folder`, or the rules allow."""
    if rules.allow_outside_paths:
        return
    try:
        real, real_folder = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        raise BadRecordError(
            raw.source, raw.line, f"{what} {path} cannot be resolved ({e})"
        ) from None
    if not real.is_relative_to(real_folder):
        raise BadRecordError(
            raw.source,
            raw.line,
            f"{what} {path} resolves to {real}, outside {real_folder}; move it inside, or pass "
            "--allow-outside-paths",
        )


def _text(value: str, raw: Raw, where: str) -> str:
    """`value` if it encodes as UTF-8 (JSON can spell a lone surrogate, which does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecordError(
            raw.source,
            raw.line,
            f"{where}a lone surrogate {value[e.start]!r} at character {e.start} of "
            f"{value[:40]!r}, which is not Unicode text; fix the \\u escape (a pair like "
            "\\ud83d\\ude00, or the character itself)",
        ) from None
    return value


def _parse_jsonl(raw: Raw, rules: Rules) -> list[Item]:
    text = _utf8(raw.payload, raw)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecordError(raw.source, raw.line, f"not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # an over-long integer, too deep a nesting
        raise BadRecordError(raw.source, raw.line, f"not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not ({"text", "items"} & set(doc)):
        raise BadRecordError(raw.source, raw.line, 'expected {"text": ...} or {"items": [...]}')
    entries = doc["items"] if "items" in doc else [{"text": doc["text"]}]
    if not isinstance(entries, list):
        raise BadRecordError(raw.source, raw.line, '"items" must be a list')
    items: list[Item] = []
    for i, entry in enumerate(entries):
        where = f"item {i}: "
        if not isinstance(entry, dict) or len(entry) != 1:
            raise BadRecordError(
                raw.source, raw.line, where + 'each item is {"text"}, {"image"} or {"image_codes"}'
            )
        ((key, value),) = entry.items()
        if key == "text" and isinstance(value, str):
            items.append(("text", _text(value, raw, where)))
        elif key == "image" and isinstance(value, str):
            if rules.external_codes:
                raise BadRecordError(
                    raw.source,
                    raw.line,
                    where + "an image file in a dataset of external image codes (--image-codes); "
                    "give every image as image_codes, or prepare without --image-codes",
                )
            value = _text(value, raw, where)
            items.append(("image", _image_path(value, Path(raw.source).parent, raw, rules)))
        elif key == "image_codes" and isinstance(value, list):
            if not rules.external_codes:
                raise BadRecordError(
                    raw.source,
                    raw.line,
                    where + "image_codes need --image-codes CODEBOOK:GRID (the external "
                    "tokenizer's codebook size and code grid, e.g. 8192:32x32)",
                )
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
                raise BadRecordError(raw.source, raw.line, where + "image_codes must be integers")
            if any(abs(c) >= 2**62 for c in value):
                raise BadRecordError(raw.source, raw.line, where + "image code out of range")
            items.append(("image_codes", np.asarray(value, dtype=np.int64)))
        else:
            raise BadRecordError(
                raw.source, raw.line, where + f"unknown item {key!r:.40}: {value!r:.40}"
            )
    return items
