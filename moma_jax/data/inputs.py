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
document; `parse` turns one into a document's items, or raises `BadRecordError` naming the file and
line. Parsing is the expensive half and runs in the worker processes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
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
    """One record as read: `kind` is jsonl, text, image or csv; `payload` its bytes (jsonl,
    text) or (image path, caption) for images."""

    kind: str
    source: str
    line: int
    payload: Any
    nbytes: int


# An item of a document: ("text", str) | ("image", Path) | ("image_codes", int array).
Item = tuple[str, Any]


def scan(paths: list[Path], max_doc_bytes: int) -> Iterator[Raw]:
    """Every record of every input, in input order (file order, then line order)."""
    for path in paths:
        if path.is_dir():
            yield from _scan_image_dir(path)
        elif not path.is_file():
            raise FileNotFoundError(f"Input {path} does not exist.")
        elif path.suffix == ".jsonl":
            yield from _scan_jsonl(path)
        elif path.suffix == ".csv":
            yield from _scan_csv(path)
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


def _scan_jsonl(path: Path) -> Iterator[Raw]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield Raw("jsonl", str(path), number, line, len(line))


def _scan_text(path: Path, max_doc_bytes: int) -> Iterator[Raw]:
    """Paragraphs (blank-line separated) joined up to max_doc_bytes; streamed line by line."""
    chunk: list[bytes] = []
    size, start = 0, 1
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                if chunk and size >= max_doc_bytes // 2:
                    yield Raw("text", str(path), start, b"".join(chunk).strip(), size)
                    chunk, size = [], 0
                elif chunk:
                    chunk.append(b"\n")
                    size += 1
                continue
            if chunk and size + len(line) > max_doc_bytes:
                yield Raw("text", str(path), start, b"".join(chunk).strip(), size)
                chunk, size = [], 0
            if not chunk:
                start = number
            chunk.append(line[:max_doc_bytes])  # a single over-long line is cut
            size += min(len(line), max_doc_bytes)
    if chunk:
        yield Raw("text", str(path), start, b"".join(chunk).strip(), size)


def _scan_image_dir(path: Path) -> Iterator[Raw]:
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for image in images:
        yield Raw("image", str(image), 0, (image, image.with_suffix(".txt")), image.stat().st_size)


def _scan_csv(path: Path) -> Iterator[Raw]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip() and not (number == 1 and line.strip().lower() == b"path,caption"):
                yield Raw("csv", str(path), number, line, len(line))


def parse(raw: Raw, *, external_codes: bool) -> list[Item]:
    """The items of one raw record (BadRecordError naming its file and line otherwise)."""
    if raw.kind == "text":
        return [("text", _utf8(raw.payload, raw))]
    if raw.kind == "image":
        image, caption_path = raw.payload
        if not caption_path.is_file():
            raise BadRecordError(
                raw.source, raw.line, f"no caption file {caption_path.name} beside it"
            )
        caption = _utf8(caption_path.read_bytes(), raw).strip()
        return [("image", image), ("text", caption)] if caption else [("image", image)]
    if raw.kind == "csv":
        row = next(csv.reader(io.StringIO(_utf8(raw.payload, raw))), [])
        if len(row) != 2:
            raise BadRecordError(
                raw.source, raw.line, f"expected 2 columns path,caption, got {row}"
            )
        image = _image_path(row[0], Path(raw.source).parent, raw)
        return [("image", image), ("text", row[1])]
    return _parse_jsonl(raw, external_codes)


def _utf8(data: bytes, raw: Raw) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(raw.source, raw.line, f"invalid UTF-8 at byte {e.start}") from None


def _image_path(name: str, base: Path, raw: Raw) -> Path:
    if "://" in name:
        raise BadRecordError(
            raw.source, raw.line, f"image {name!r} is a URL; download it and give a local path"
        )
    return base / name


def _parse_jsonl(raw: Raw, external_codes: bool) -> list[Item]:
    try:
        doc = json.loads(_utf8(raw.payload, raw))
    except json.JSONDecodeError as e:
        raise BadRecordError(raw.source, raw.line, f"not valid JSON ({e.msg})") from None
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
            items.append(("text", value))
        elif key == "image" and isinstance(value, str):
            if external_codes:
                raise BadRecordError(
                    raw.source,
                    raw.line,
                    where + "an image file in a dataset of external image codes (--image-codes); "
                    "give every image as image_codes, or prepare without --image-codes",
                )
            items.append(("image", _image_path(value, Path(raw.source).parent, raw)))
        elif key == "image_codes" and isinstance(value, list):
            if not external_codes:
                raise BadRecordError(
                    raw.source,
                    raw.line,
                    where + "image_codes need --image-codes CODEBOOK:GRID (the external "
                    "tokenizer's codebook size and code grid, e.g. 8192:32x32)",
                )
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
                raise BadRecordError(raw.source, raw.line, where + "image_codes must be integers")
            items.append(("image_codes", np.asarray(value, dtype=np.int64)))
        else:
            raise BadRecordError(
                raw.source, raw.line, where + f"unknown item {key!r}: {value!r:.40}"
            )
    return items
