"""Grain input pipeline: ArrayRecord documents -> shuffled, per-process, packed [B, L] batches.

Training pipeline, per process:
    ArrayRecord source -> decode + validate each record -> global shuffle of documents (seeded)
    -> this process's slice (every ``process_count``-th document) -> repeat forever, reshuffled
    each epoch -> pack into rows of ``seq_len`` -> batches of ``batch_size // process_count`` rows.
Within an epoch the processes' slices are disjoint and together cover every document once.

The iterator is checkpointable: its state is a small JSON dict (Grain's read position plus the
packer's offset into the current document), saved and restored through Orbax with
``grain.checkpoint.CheckpointSave(iterator)`` / ``grain.checkpoint.CheckpointRestore(iterator)``.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
from pathlib import Path
from typing import Any

import grain
import numpy as np

from moma_jax.data import records
from moma_jax.data.packing import ROW_KEYS, RowPacker, empty_row
from moma_jax.data.prepare import ensure_data, load_manifest
from moma_jax.data.vocab import Vocab

Batch = dict[str, np.ndarray]  # tokens, modality, segment_ids, positions: int32 [B, L]


@dataclasses.dataclass(frozen=True)
class _DecodeRecord:
    """Record bytes -> validated ``records.Document``; errors name the shard and record."""

    vocab: Vocab
    shard_paths: tuple[str, ...]
    shard_starts: tuple[int, ...]  # index of each shard's first record in the split

    def __call__(self, index: int, data: bytes) -> records.Document:
        shard = bisect.bisect_right(self.shard_starts, index) - 1
        name = f"{self.shard_paths[shard]} record {index - self.shard_starts[shard]}"
        doc = records.deserialize(data, name)
        records.validate(doc.tokens, doc.modality, self.vocab, f"{name} (document {doc.doc_id})")
        return doc


def document_dataset(data_dir: str | Path | None, split: str) -> grain.MapDataset:
    """Decoded, validated documents of one split in stored order (random access)."""
    path = ensure_data(None if data_dir is None else str(data_dir))
    manifest = load_manifest(path)
    if split not in manifest["splits"]:
        raise ValueError(f"Split {split!r} is not in {path}; it has {list(manifest['splits'])}.")
    info = manifest["splits"][split]
    shard_paths = tuple(str(path / s) for s in info["shards"])
    starts = tuple(int(s) for s in np.cumsum([0, *info["shard_records"][:-1]]))
    source = _NamedSource(shard_paths, starts)
    decode = _DecodeRecord(Vocab.from_dict(manifest["vocab"]), shard_paths, starts)
    return grain.MapDataset.source(source).map_with_index(decode)


_DATA_FIX = (
    "Restore the file, or prepare the data again (python scripts/prepare_data.py ... --force); "
    "the run stopped before training on it, so its checkpoints are all good."
)


class _NamedSource:
    """The shards' ArrayRecord source; a shard or record that cannot be read raises ValueError
    naming the file and the record index (a damaged file must stop the run, not train it)."""

    def __init__(self, shard_paths: tuple[str, ...], starts: tuple[int, ...]):
        self.shard_paths, self.starts = shard_paths, starts
        try:
            self.source = grain.sources.ArrayRecordDataSource(list(shard_paths))
        except Exception as e:  # the C++ reader names no file: find the one that fails
            raise ValueError(f"{self._unreadable_shard()} is unreadable ({e}). {_DATA_FIX}") from e

    def _unreadable_shard(self) -> str:
        from array_record.python.array_record_module import ArrayRecordReader

        for shard in self.shard_paths:
            try:
                ArrayRecordReader(shard).close()
            except Exception:
                return f"data shard {shard}"
        return f"one of the data shards {list(self.shard_paths)}"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> bytes:
        try:
            return self.source[index]
        except Exception as e:
            shard = bisect.bisect_right(self.starts, index) - 1
            raise ValueError(
                f"{self.shard_paths[shard]} record {index - self.starts[shard]} is unreadable "
                f"({type(e).__name__}: {str(e)[:200]}). {_DATA_FIX}"
            ) from e

    def __repr__(self) -> str:
        return f"_NamedSource({len(self.shard_paths)} shards)"


class _PackedIterator(grain.DatasetIterator):
    """Packs the parent's documents into rows; state = parent state at the current document."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._packer = RowPacker(seq_len, pad_id)
        self._parent_state_at_head: dict[str, Any] | None = None

    def _fetch(self) -> tuple[np.ndarray, np.ndarray] | None:
        # Remember where the document came from: a restore re-reads it and skips `offset` tokens.
        self._parent_state_at_head = copy.deepcopy(self._parent.get_state())
        try:
            doc = next(self._parent)
        except StopIteration:
            return None
        return doc.tokens, doc.modality

    def __next__(self) -> dict[str, np.ndarray]:
        row = self._packer.next_row(self._fetch)
        if row is None:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        if self._packer.has_head:
            parent_state = copy.deepcopy(self._parent_state_at_head)
        else:
            parent_state = self._parent.get_state()
        return {"parent": parent_state, "offset": self._packer.offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._packer.reset(int(state["offset"]))

    def __str__(self) -> str:
        return f"PackedIterator(seq_len={self._packer.seq_len})"


class _PackedIterDataset(grain.IterDataset):
    """Greedy next-fit packing of a document stream (see ``packing``) as a Grain dataset."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __iter__(self) -> _PackedIterator:
        return _PackedIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

    def __str__(self) -> str:
        return f"PackedIterDataset(seq_len={self._seq_len})"


def _check_args(
    manifest: dict[str, Any],
    split: str,
    seq_len: int,
    batch_size: int,
    process_index: int,
    process_count: int,
) -> None:
    """Clear errors for arguments the pipeline cannot honour."""
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be a positive multiple of process_count="
            f"{process_count} (each process loads batch_size // process_count rows). Set "
            f"batch_size to a multiple of {process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    need = manifest["image"]["codes_per_image"] + 2  # BOI, codes, EOI
    if seq_len < need:
        raise ValueError(
            f"seq_len={seq_len} cannot hold one whole image ({need} tokens: BOI, "
            f"{need - 2} codes, EOI), so every image would be cut apart. Use seq_len >= {need}."
        )
    if manifest["splits"][split]["records"] < process_count:
        raise ValueError(
            f"Split {split!r} has {manifest['splits'][split]['records']} documents, "
            f"fewer than process_count={process_count}; use more data."
        )


def train_documents(
    data_dir: str | Path | None,
    *,
    split: str,
    seed: int,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """One endless document stream: shuffle, take every `process_count`-th document from
    `process_index` (a stream's slice), repeat (reshuffled)."""
    # Hash the seed: Grain reshuffles epoch e with seed + e, so seeds s and s + 1 would replay
    # each other's epochs one epoch apart.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    return (
        document_dataset(data_dir, split)
        .shuffle(seed=shuffle_seed)
        .slice(slice(process_index, None, process_count))
        .repeat()
    )


def make_train_iterator(
    data_dir: str | Path | None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str = "train",
    streams: int = 0,
) -> grain.DatasetIterator:
    """Endless checkpointable iterator of this process's batches (int32 [B/process_count, L]).

    The global batch is packed from `streams` document streams (0: one per process), each
    giving batch_size / streams consecutive rows; this process runs its streams only. With a
    fixed `streams`, any process count that divides it yields the same global batches.
    """
    path = ensure_data(None if data_dir is None else str(data_dir))
    manifest = load_manifest(path)
    n = streams or process_count
    if streams and (n % process_count or batch_size % n):
        raise ValueError(
            f"data.streams={n} must be a multiple of the process count {process_count} and "
            f"divide batch_size={batch_size}"
        )
    _check_args(manifest, split, seq_len, batch_size, process_index, n)
    pad = Vocab.from_dict(manifest["vocab"]).pad
    per_process = n // process_count
    mine = range(process_index * per_process, (process_index + 1) * per_process)
    batches = []
    for stream in mine:
        docs = train_documents(path, split=split, seed=seed, process_index=stream, process_count=n)
        rows = _PackedIterDataset(
            docs.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=256)),
            seq_len,
            pad,
        )
        batches.append(rows.batch(batch_size // n, drop_remainder=True))
    if len(batches) == 1:
        return iter(batches[0])  # the state format of a single stream, as before streams
    return _StreamsIterator([iter(b) for b in batches])


class _StreamsIterator(grain.DatasetIterator):
    """Several streams' batches side by side (rows of stream 0, then 1, ...); state: theirs."""

    def __init__(self, streams: list[grain.DatasetIterator]):
        super().__init__()
        self._streams = streams

    def __next__(self) -> Batch:
        parts = [next(s) for s in self._streams]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {"streams": [s.get_state() for s in self._streams]}

    def set_state(self, state: dict[str, Any]) -> None:
        for s, st in zip(self._streams, state["streams"], strict=True):
            s.set_state(st)


def eval_batches(
    data_dir: str | Path | None,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    split: str = "heldout",
    process_index: int = 0,
    process_count: int = 1,
) -> list[Batch]:
    """The first ``num_batches`` packed batches of ``split`` in stored order (no shuffle).

    Deterministic: the same list on every call. When the split runs out, it stops early instead
    of repeating; the last batch is topped up with padding rows (segment id 0, not in the loss)
    so every batch has the same shape. With several processes each gets its rows of every batch.
    """
    path = ensure_data(None if data_dir is None else str(data_dir))
    manifest = load_manifest(path)
    _check_args(manifest, split, seq_len, batch_size, process_index, process_count)
    pad = Vocab.from_dict(manifest["vocab"]).pad
    docs = document_dataset(path, split)
    doc_iter = (docs[i] for i in range(len(docs)))
    packer = RowPacker(seq_len, pad)

    def fetch() -> tuple[np.ndarray, np.ndarray] | None:
        doc = next(doc_iter, None)
        return None if doc is None else (doc.tokens, doc.modality)

    rows_per_process = batch_size // process_count
    mine = slice(process_index * rows_per_process, (process_index + 1) * rows_per_process)
    batches: list[Batch] = []
    while len(batches) < num_batches:
        rows: list[dict[str, np.ndarray]] = []
        while len(rows) < batch_size and (row := packer.next_row(fetch)) is not None:
            rows.append(row)
        if not rows:
            break
        rows += [empty_row(seq_len, pad)] * (batch_size - len(rows))
        batches.append({k: np.stack([r[k] for r in rows[mine]]) for k in ROW_KEYS})
    return batches
