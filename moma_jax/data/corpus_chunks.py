"""One chunk of a corpus preparation (`corpus.py`): its records tokenized and written into
ArrayRecord shards, then committed; and every chunk in order, here or in worker processes.

Chunk k holds the records read in order up to about `chunk_bytes` of input, so it is the same for
any number of workers. Its shards are written under temporary names and renamed when closed;
`chunks/k.json` (its counts), written last, is its commit. An error or Ctrl-C midway removes
the chunk's shards: the rerun writes it again.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from moma_jax.data import inputs, outdir, records
from moma_jax.data.corpus_options import Options, held_out, image_first
from moma_jax.data.corpus_tokenizers import Tokenizers, load_tokenizers
from moma_jax.data.images import load_image
from moma_jax.data.outdir import CHUNKS
from moma_jax.modality import MODALITY_NAMES

LISTED_BAD = 20  # bad records listed in the manifest (all are counted)
# One record per chunk (random access reads one record), one writer thread, snappy: brotli (the
# default) keeps ~10 MB of window per writer, which broke the --max-memory bound.
WRITER_OPTIONS = "group_size:1,max_parallelism:1,snappy"


def tokenize(
    items: list[inputs.Item], tok: Tokenizers, raw: inputs.Raw, opts: Options
) -> np.ndarray:
    """[BOS, items..., EOS]: text ids, [BOI, codes + offset, EOI] per image."""
    vocab = tok.vocab
    parts: list[np.ndarray] = [np.asarray([vocab.bos])]
    for kind, value in items:
        if kind == "text":
            if value:
                parts.append(tok.text.encode(value))
            continue
        if kind == "image":
            array = load_image(
                value,
                opts.image_size,
                opts.image_channels,
                raw.source,
                raw.line,
                opts.max_image_pixels,
            )
            if tok.image is None:  # every sampled image was bad: no codebook was fitted
                raise inputs.BadRecordError(raw.source, raw.line, "an image but no image codebook")
            codes = tok.image.encode(array[None])[0]
        else:
            assert tok.external is not None  # parse() refuses image_codes otherwise
            codes = tok.external.check(value, raw.source, raw.line)
        parts.append(np.concatenate([[vocab.boi], codes + vocab.image_offset, [vocab.eoi]]))
    if len(parts) == 1:
        raise inputs.BadRecordError(raw.source, raw.line, "empty document (no text and no image)")
    parts.append(np.asarray([vocab.eos]))
    return np.concatenate(parts).astype(np.int32)


class _ShardWriter:
    """One split's shards of one chunk: `{split}-{chunk}-{j}.array_record`, each at most
    `shard_bytes` of records, written to a temporary file and renamed when closed."""

    def __init__(self, out: Path, split: str, chunk: int, shard_bytes: int):
        self.out, self.split, self.chunk, self.shard_bytes = out, split, chunk, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.writer: Any = None
        self.file: outdir.Replacement | None = None
        self.size = 0

    def write(self, record: bytes) -> None:
        if self.writer is None or self.size + len(record) > self.shard_bytes and self.size:
            self.close()
            name = f"{self.split}-{self.chunk:06d}-{len(self.shards):03d}.array_record"
            self.file = outdir.Replacement(self.out / name)
            self.shards.append({"file": name, "records": 0})
            self.size = 0
            with outdir.disk_errors(self.file.path):
                self.writer = ArrayRecordWriter(str(self.file.tmp), WRITER_OPTIONS)
        with outdir.disk_errors(self.out / self.shards[-1]["file"]):
            self.writer.write(record)
        self.size += len(record)
        self.shards[-1]["records"] += 1

    def close(self, keep: bool = True) -> None:
        """Rename the open shard into place; not `keep` (after an error), remove it."""
        writer, file = self.writer, self.file
        self.writer = self.file = None
        if file is None:
            return
        if keep and writer is not None:
            try:
                with outdir.disk_errors(file.path):
                    writer.close()  # writes the last records: fails on a full disk
                file.commit()
            except BaseException:
                file.discard()
                raise
            return
        if writer is not None:
            with contextlib.suppress(RuntimeError, OSError):  # the failed writer's second error
                writer.close()
        file.discard()


def run_chunk(task: tuple[int, int, list[inputs.Raw]], tok: Tokenizers, opts: Options, out: Path):
    """Tokenize and write chunk k (task = (k, index of its first record, records)); returns
    its counts, also committed to `chunks/k.json`. Raises BadRecordError unless skip_bad."""
    k, first_index, raws = task
    writers = {s: _ShardWriter(out, s, k, opts.shard_bytes) for s in ("train", "heldout")}
    tokens = {s: np.zeros(len(MODALITY_NAMES), np.int64) for s in writers}
    bad: list[str] = []
    n_bad = 0
    try:
        for offset, raw in enumerate(raws):
            index = first_index + offset
            try:
                items = inputs.parse(raw, opts.rules)
                if raw.kind in ("image", "csv") and not image_first(opts.seed, index):
                    items = items[::-1]
                ids = tokenize(items, tok, raw, opts)
            except inputs.BadRecordError as e:
                if not opts.skip_bad:
                    raise
                n_bad += 1
                if len(bad) < LISTED_BAD:
                    bad.append(str(e))
                continue
            modality = tok.vocab.modality_of(ids)
            records.validate(ids, modality, tok.vocab, f"{raw.source}:{raw.line}")
            split = "heldout" if held_out(opts.seed, index, opts.heldout_fraction) else "train"
            writers[split].write(records.serialize(index, ids, modality))
            tokens[split] += np.bincount(modality, minlength=len(MODALITY_NAMES))
        for w in writers.values():  # closing writes the last records: it fails on a full disk
            w.close()
    except BaseException:
        for w in writers.values():  # no half chunk stays behind: the rerun writes it again
            w.close(keep=False)
            for shard in w.shards:
                (out / shard["file"]).unlink(missing_ok=True)
        raise
    result = {
        "chunk": k,
        "input_bytes": sum(r.nbytes for r in raws),
        "documents": len(raws) - n_bad,
        "bad_count": n_bad,
        "bad": bad,
        "splits": {
            s: {"shards": w.shards, "modality_tokens": [int(t) for t in tokens[s]]}
            for s, w in writers.items()
        },
    }
    outdir.write_json(out / CHUNKS / f"{k:06d}.json", result)
    return result


_WORKER: dict[str, Any] = {}


def _worker_init(opts: Options, out: Path) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _WORKER.update(opts=opts, out=out, tok=load_tokenizers(opts, out))


def _worker_run(task: tuple[int, int, list[inputs.Raw]]) -> dict[str, Any]:
    return run_chunk(task, _WORKER["tok"], _WORKER["opts"], _WORKER["out"])


def chunks(opts: Options, paths: list[Path], chunk_bytes: int) -> Iterator[tuple[int, int, list]]:
    """(k, first record index, records) for every chunk, in input order."""
    k, first, current, size = 0, 0, [], 0
    for raw in inputs.scan(paths, opts.max_doc_bytes, opts.max_record_bytes):
        current.append(raw)
        size += raw.nbytes
        if size >= chunk_bytes:
            yield k, first, current
            k, first, current, size = k + 1, first + len(current), [], 0
    if current:
        yield k, first, current


def run_chunks(
    opts: Options,
    paths: list[Path],
    out: Path,
    tok: Tokenizers,
    done: set[int],
    workers: int,
    collect: Callable[[dict[str, Any]], None],
) -> None:
    """Every chunk's counts to `collect`, in chunk order: read back if committed, else written
    here (one worker) or by a pool, with a bounded number in flight."""
    tasks = chunks(opts, paths, opts.chunk_bytes)

    def committed(k: int) -> dict[str, Any]:
        return json.loads((out / CHUNKS / f"{k:06d}.json").read_text())

    if workers <= 1:
        for task in tasks:
            collect(committed(task[0]) if task[0] in done else run_chunk(task, tok, opts, out))
        return
    pool = _Workers(workers, opts, out)
    try:
        window: deque = deque()  # at most `in_flight` chunks: bounded memory
        limit = opts.in_flight(workers)
        for task in tasks:
            window.append((task[0], None if task[0] in done else pool.submit(task)))
            while len(window) > limit or (window and window[0][1] is None):
                k, pending = window.popleft()
                collect(committed(k) if pending is None else pool.result(pending))
        while window:
            k, pending = window.popleft()
            collect(committed(k) if pending is None else pool.result(pending))
    finally:
        pool.close()


class WorkerDiedError(ChildProcessError):
    """A worker process died; an OSError, so prepare_data prints it in one line, exit 2."""

    def __init__(self) -> None:
        super().__init__(
            "a worker process of the preparation died (killed, or out of memory); the chunks "
            "committed so far are kept: rerun the same command, with fewer --workers or a "
            "smaller --max-memory if memory ran out"
        )


class _Workers:
    """Worker processes for chunks (spawned, so no JAX or XLA thread is forked).

    A `ProcessPoolExecutor`, not `multiprocessing.Pool`: a worker that dies (killed, out of
    memory) fails the preparation with `BrokenProcessPool` where the Pool would wait forever for
    its task, and closing after an error never waits on a queue lock an idle worker holds (the
    Pool's `terminate()` can). Workers never see Ctrl-C: they start with SIGINT blocked (the mask
    survives their exec) and their initializer ignores it; the main process alone handles it,
    with one line, not a traceback per worker.
    """

    def __init__(self, workers: int, opts: Options, out: Path):
        self.executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(opts, out),
        )

    def submit(self, task: tuple[int, int, list[inputs.Raw]]) -> Future:
        """The chunk on a worker; `WorkerDiedError` if a worker has died (seen here or in
        `result`, whichever comes first)."""
        try:
            if threading.current_thread() is not threading.main_thread():
                return self.executor.submit(_worker_run, task)
            # A worker may start here: it inherits SIGINT blocked (ignored until its initializer
            # sets SIG_IGN). Blocked, not ignored, in this process: a Ctrl-C in this window stays
            # pending and is delivered when the mask is restored, never lost.
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                return self.executor.submit(_worker_run, task)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        except BrokenProcessPool as e:
            raise WorkerDiedError() from e

    @staticmethod
    def result(pending: Future) -> dict[str, Any]:
        try:
            return pending.result()
        except BrokenProcessPool as e:
            raise WorkerDiedError() from e

    def close(self) -> None:
        """Cancel what has not started and wait for the running chunks (each removes its own
        shards on error), so no worker writes into --out after we return."""
        self.executor.shutdown(wait=True, cancel_futures=True)
