"""Greedy next-fit packing of documents into fixed-length rows, in pure NumPy.

A row of length L holds one or more documents, each with its own segment id (1, 2, ... within
the row) and positions that restart at 0; the rest of the row is PAD with modality TEXT,
segment id 0 and position 0. Attention masks on equal segment ids and the loss skips segment 0,
so documents never see each other and padding is never a target.

Rules, applied to the stream of documents in order:
  1. A document that fits in the rest of the current row is appended to it.
  2. One that does not fit closes the row (the remainder is padded) and starts the next row.
  3. A document longer than L is split into pieces of exactly L tokens, each filling a row of
     its own as its own segment with positions restarting at 0; its last piece (< L tokens)
     starts a row that later documents may join. Tokens never cross a piece boundary in the
     loss, so a split costs one target per piece.

The packer's checkpointable state is one integer: how many tokens of the document at the
cursor were already emitted. Whoever feeds it documents saves where that document came from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from moma_jax.modality import TEXT

DocumentArrays = tuple[np.ndarray, np.ndarray]  # (tokens int32 [N], modality int [N])
ROW_KEYS = ("tokens", "modality", "segment_ids", "positions")


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of padding only."""
    return {
        "tokens": np.full(seq_len, pad_id, dtype=np.int32),
        "modality": np.full(seq_len, TEXT, dtype=np.int32),
        "segment_ids": np.zeros(seq_len, dtype=np.int32),
        "positions": np.zeros(seq_len, dtype=np.int32),
    }


class RowPacker:
    """Builds rows one at a time from documents pulled through a ``fetch`` callback."""

    def __init__(self, seq_len: int, pad_id: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}.")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self._head: DocumentArrays | None = None  # document at the cursor, not fully emitted
        self._offset = 0  # tokens of the head (or, if none is held, of the next one) emitted

    @property
    def has_head(self) -> bool:
        """Whether a fetched document is held that is not fully emitted yet."""
        return self._head is not None

    @property
    def offset(self) -> int:
        """Tokens of the document at the cursor already emitted (the whole packer state)."""
        return self._offset

    def reset(self, offset: int = 0) -> None:
        """Drop the held document; skip ``offset`` tokens of the next document fetched."""
        self._head = None
        self._offset = offset

    def next_row(self, fetch: Callable[[], DocumentArrays | None]) -> dict[str, np.ndarray] | None:
        """Next packed row, or None once ``fetch`` returns None and nothing is left."""
        row = empty_row(self.seq_len, self.pad_id)
        used = segment = 0
        while used < self.seq_len:
            if self._head is None:
                self._head = fetch()
                if self._head is None:
                    break
            tokens, modality = self._head
            rest = len(tokens) - self._offset
            if rest == 0:  # an empty document takes no segment
                self.reset()
                continue
            if rest > self.seq_len - used:
                if used:
                    break  # rule 2: close this row, the head starts the next one
                rest = self.seq_len  # rule 3: a full piece of an over-long document
            span = slice(used, used + rest)
            piece = slice(self._offset, self._offset + rest)
            segment += 1
            row["tokens"][span] = tokens[piece]
            row["modality"][span] = modality[piece]
            row["segment_ids"][span] = segment
            row["positions"][span] = np.arange(rest, dtype=np.int32)
            used += rest
            self._offset += rest
            if self._offset == len(tokens):
                self.reset()
        return row if used else None


def pack_documents(
    docs: Iterable[DocumentArrays], *, seq_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Pack a finite sequence of documents into rows: dict of int32 [R, L] arrays."""
    it = iter(docs)
    packer = RowPacker(seq_len, pad_id)
    rows = []
    while (row := packer.next_row(lambda: next(it, None))) is not None:
        rows.append(row)
    if not rows:
        return {k: np.zeros((0, seq_len), dtype=np.int32) for k in ROW_KEYS}
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}
