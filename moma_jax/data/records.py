"""One record = one document: ``tokens`` (int32) and ``modality`` (int8) of equal length.

Byte layout of a serialised record (little endian):

    uint8 format version | uint32 document id | uint32 length N
    N x int32 tokens | N x int8 modality

The document id names the record in error messages and lets tests check which documents a
pipeline produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path
from typing import Any

import numpy as np

from moma_jax.data.vocab import Vocab
from moma_jax.modality import MODALITY_NAMES

FORMAT_VERSION = 1
_HEADER = struct.Struct("<BII")
_FIX = (
    "Re-run `python scripts/prepare_data.py --out DIR --force`, or fix the code that wrote "
    "this record."
)


@dataclasses.dataclass(frozen=True, eq=False)
class Document:
    """A decoded record."""

    doc_id: int
    tokens: np.ndarray  # int32 [N]
    modality: np.ndarray  # int8 [N]


def serialize(doc_id: int, tokens: np.ndarray, modality: np.ndarray) -> bytes:
    """Pack a document into bytes (header, then tokens, then modality)."""
    tokens = np.asarray(tokens, dtype="<i4")
    modality = np.asarray(modality, dtype=np.int8)
    if tokens.shape != modality.shape or tokens.ndim != 1:
        raise ValueError(
            f"Document {doc_id}: tokens {tokens.shape} and modality "
            f"{modality.shape} must be 1-D and of equal length."
        )
    return _HEADER.pack(FORMAT_VERSION, doc_id, len(tokens)) + tokens.tobytes() + modality.tobytes()


def deserialize(data: bytes, record_name: str = "record") -> Document:
    """Inverse of ``serialize``; checks the version and that the byte count adds up."""
    if len(data) < _HEADER.size:
        raise ValueError(
            f"{record_name}: {len(data)} bytes is shorter than the record header. " + _FIX
        )
    version, doc_id, n = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{record_name}: record format version {version}, this code reads "
            f"version {FORMAT_VERSION}. " + _FIX
        )
    if len(data) != _HEADER.size + 5 * n:
        raise ValueError(
            f"{record_name}: header says {n} tokens ({_HEADER.size + 5 * n} bytes) "
            f"but the record has {len(data)} bytes. " + _FIX
        )
    tokens = np.frombuffer(data, dtype="<i4", count=n, offset=_HEADER.size).astype(np.int32)
    modality = np.frombuffer(data, dtype=np.int8, count=n, offset=_HEADER.size + 4 * n)
    return Document(doc_id, tokens, modality)


def validate(tokens: np.ndarray, modality: np.ndarray, vocab: Vocab, record_name: str) -> None:
    """Raise ValueError naming ``record_name``, the problem and the fix if a document is invalid.

    Checks: non-empty; equal lengths; every id in [0, vocab.size) and not PAD (PAD is added by
    packing only); every modality id known; each token's modality agrees with the vocabulary
    (image codes and BOI/EOI are image, the rest text), since routing trusts the modality array.
    """
    tokens, modality = np.asarray(tokens), np.asarray(modality)
    if tokens.ndim != 1 or modality.ndim != 1 or len(tokens) != len(modality):
        raise ValueError(
            f"{record_name}: tokens has shape {tokens.shape} but modality has shape "
            f"{modality.shape}; both must be 1-D of equal length. " + _FIX
        )
    if len(tokens) == 0:
        raise ValueError(
            f"{record_name}: empty record (no tokens). Drop empty documents before writing. " + _FIX
        )
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab.size) | (tokens == vocab.pad))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{record_name}: token id {int(tokens[i])} at position {i} is outside the vocabulary "
            f"[0, {vocab.size}) or is PAD ({vocab.pad}), which only packing may insert "
            f"({len(bad)} such tokens). Check that the data was written for this vocabulary "
            f"(n_image_codes={vocab.n_image_codes}). " + _FIX
        )
    bad = np.flatnonzero((modality < 0) | (modality >= len(MODALITY_NAMES)))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{record_name}: modality id {int(modality[i])} at position {i} is unknown; known ids "
            f"are {dict(enumerate(MODALITY_NAMES))}. " + _FIX
        )
    expected = vocab.modality_of(tokens)
    bad = np.flatnonzero(expected != modality)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{record_name}: token id {int(tokens[i])} at position {i} has modality "
            f"{MODALITY_NAMES[modality[i]]} but the vocabulary makes it "
            f"{MODALITY_NAMES[expected[i]]} (image codes and BOI/EOI are image, the rest "
            "text). " + _FIX
        )


def records_digest(out: Path, splits: dict[str, Any]) -> dict[str, str]:
    """Per split, the SHA-256 of its records in reading order (the manifest's shards in order,
    each record's length, then its bytes): what the token streams hold, whatever the ArrayRecord
    container around them, so an input edited without changing any count shows here. One pass
    over the shards."""
    from array_record.python.array_record_module import ArrayRecordReader

    digests = {}
    for split, info in sorted(splits.items()):
        digest = hashlib.sha256()
        for shard in info["shards"]:
            reader = ArrayRecordReader(str(out / shard))
            try:
                n = reader.num_records()
                for start in range(0, n, 1024):
                    for record in reader.read(start, min(start + 1024, n)):
                        digest.update(struct.pack("<Q", len(record)))
                        digest.update(record)
            finally:
                reader.close()
        digests[split] = digest.hexdigest()
    return digests
