"""Prepare a user's corpus: streaming, in parallel worker processes, resumable, the same shards
for any number of workers.

    python scripts/prepare_data.py --input PATH... --out DIR [options]   (see that script)

1. **Tokenizers first.** When a BPE or the k-means image codebook must be trained, one streaming
   pass draws a seeded reservoir sample of documents (bounded by `max_memory`) and trains them;
   they are written into DIR before any shard.
2. **Chunks.** The inputs are read in order (`inputs.scan`) and cut into chunks of about
   `chunk_bytes` of input; chunk k is the same whatever the number of workers. A worker
   tokenizes chunk k into `train-k-j` / `heldout-k-j` ArrayRecord shards of at most
   `shard_bytes` of records each (written under a temporary name, renamed when closed), then
   writes `chunks/k.json` (its counts): that file is the chunk's commit.
3. **Resume.** `prepare_state.json` records the options and every input file's size and mtime. A
   rerun with the same ones skips the committed chunks; with other ones an unfinished
   preparation restarts from scratch (a finished dataset needs `--force`).
4. **Manifest last.** Written (atomically) only after every chunk committed, from the chunks'
   counts in chunk order, so it never names a missing or half-written shard.

Each document is held out with probability `heldout_fraction` by a seeded hash of its index in
the input order. Bad records (inputs.BadRecordError) stop the preparation, naming the file and the
line, or with `skip_bad` are counted and listed in the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from moma_jax.data import inputs, records
from moma_jax.data.corpus_options import Options, held_out, image_first
from moma_jax.data.corpus_tokenizers import Tokenizers, load_tokenizers, make_tokenizers
from moma_jax.data.image_tokenizer import ImageTokenizer
from moma_jax.data.images import load_image
from moma_jax.data.prepare import MANIFEST, TOKENIZER_FILE
from moma_jax.modality import MODALITY_NAMES

STATE = "prepare_state.json"
CHUNKS = "chunks"
LISTED_BAD = 20  # bad records listed in the manifest (all are counted)
# One record per chunk (random access reads one record), one writer thread, snappy: brotli (the
# default) keeps ~10 MB of window per writer, which broke the --max-memory bound.
WRITER_OPTIONS = "group_size:1,max_parallelism:1,snappy"


# --- One chunk ----------------------------------------------------------------------------------


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
            array = load_image(value, opts.image_size, opts.image_channels, raw.source, raw.line)
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
    `shard_bytes` of records, written under `.tmp` and renamed when closed."""

    def __init__(self, out: Path, split: str, chunk: int, shard_bytes: int):
        self.out, self.split, self.chunk, self.shard_bytes = out, split, chunk, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.writer: Any = None
        self.size = 0

    def write(self, record: bytes) -> None:
        if self.writer is None or self.size + len(record) > self.shard_bytes and self.size:
            self.close()
            name = f"{self.split}-{self.chunk:06d}-{len(self.shards):03d}.array_record"
            self.writer = ArrayRecordWriter(str(self.out / (name + ".tmp")), WRITER_OPTIONS)
            self.shards.append({"file": name, "records": 0})
            self.size = 0
        self.writer.write(record)
        self.size += len(record)
        self.shards[-1]["records"] += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            name = self.shards[-1]["file"]
            os.replace(self.out / (name + ".tmp"), self.out / name)
            self.writer = None


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
                items = inputs.parse(raw, external_codes=tok.external is not None)
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
    except BaseException:
        for w in writers.values():  # no half chunk stays behind: the rerun writes it again
            w.close()
            for shard in w.shards:
                (out / shard["file"]).unlink(missing_ok=True)
        raise
    for w in writers.values():
        w.close()
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
    _write_json(out / CHUNKS / f"{k:06d}.json", result)
    return result


_WORKER: dict[str, Any] = {}


def _worker_init(opts: Options, out: Path) -> None:
    _WORKER.update(opts=opts, out=out, tok=load_tokenizers(opts, out))


def _worker_run(task: tuple[int, int, list[inputs.Raw]]) -> dict[str, Any]:
    return run_chunk(task, _WORKER["tok"], _WORKER["opts"], _WORKER["out"])


# --- The whole preparation ----------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _fingerprint(opts: Options, paths: list[Path]) -> dict[str, Any]:
    files = [
        {"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
        for p in inputs.input_files(paths)
    ]
    return {"options": dataclasses.asdict(opts), "files": files}


def _chunks(opts: Options, paths: list[Path], chunk_bytes: int) -> Iterator[tuple[int, int, list]]:
    """(k, first record index, records) for every chunk, in input order."""
    k, first, current, size = 0, 0, [], 0
    for raw in inputs.scan(paths, opts.max_doc_bytes):
        current.append(raw)
        size += raw.nbytes
        if size >= chunk_bytes:
            yield k, first, current
            k, first, current, size = k + 1, first + len(current), [], 0
    if current:
        yield k, first, current


class Progress:
    """Documents/s and MB/s on stderr, at most twice a second."""

    def __init__(self, total_bytes: int, enabled: bool = True):
        self.total, self.enabled = total_bytes, enabled
        self.start = self.last = time.perf_counter()
        self.docs = self.bytes = self.bad = 0

    def add(self, result: dict[str, Any], final: bool = False) -> None:
        self.docs += result["documents"]
        self.bytes += result["input_bytes"]
        self.bad += result["bad_count"]
        now = time.perf_counter()
        if self.enabled and (final or now - self.last > 0.5):
            self.last = now
            dt = max(now - self.start, 1e-9)
            print(
                f"\r[prepare] {self.docs:,} docs  "
                f"{self.bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB"
                f"  {self.docs / dt:,.0f} docs/s  {self.bytes / 1e6 / dt:,.2f} MB/s"
                f"  bad {self.bad}",
                end="\n" if final else "",
                file=sys.stderr,
                flush=True,
            )


def prepare_corpus(
    opts: Options,
    out_dir: str | Path,
    *,
    workers: int = 1,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Prepare the corpus of `opts` into `out_dir`; returns the manifest (see the module doc)."""
    opts.check()
    log = (lambda m: None) if quiet else (lambda m: print(f"[prepare] {m}", file=sys.stderr))
    paths = [Path(p).expanduser().absolute() for p in opts.inputs]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"--input {p} does not exist.")
    out = Path(out_dir).expanduser().absolute()
    fingerprint = _fingerprint(opts, paths)
    state_file = out / STATE
    if (out / MANIFEST).is_file():
        same = state_file.is_file() and json.loads(state_file.read_text()) == fingerprint
        if same and not force:
            log(f"{out} is already prepared from these inputs and options")
            return json.loads((out / MANIFEST).read_text())
        if not force:
            raise ValueError(
                f"{out} already holds a dataset prepared from other inputs or options. Pass "
                "--force to replace it, or choose another --out."
            )
    resumable = state_file.is_file() and json.loads(state_file.read_text()) == fingerprint
    if out.exists() and any(out.iterdir()) and not state_file.is_file() and not force:
        raise ValueError(
            f"{out} is not empty and holds no dataset; refusing to overwrite it. Choose a new "
            "or empty --out directory."
        )
    if out.exists() and not resumable:
        if state_file.is_file() and not (out / MANIFEST).is_file():
            log(f"{out}: an unfinished preparation with other inputs/options; starting again")
        shutil.rmtree(out)
    (out / CHUNKS).mkdir(parents=True, exist_ok=True)
    _write_json(state_file, fingerprint)
    start = time.perf_counter()

    if (out / "tokenizers.json").is_file():
        tok = load_tokenizers(opts, out)
    else:
        tok = make_tokenizers(opts, paths, out, log)
        _write_json(out / "tokenizers.json", {"text": tok.text.manifest()})
    done = {int(p.stem) for p in (out / CHUNKS).glob("*.json")}
    if done:
        log(f"resuming: {len(done)} chunks already committed")
    for stale in out.glob("*.array_record.tmp"):  # a killed chunk's partial shard
        stale.unlink()

    progress = Progress(sum(f["bytes"] for f in fingerprint["files"]), enabled=not quiet)
    results: dict[int, dict[str, Any]] = {}
    tasks = _chunks(opts, paths, opts.chunk_bytes)

    def collect(result: dict[str, Any]) -> None:
        results[result["chunk"]] = result
        progress.add(result)

    def committed(k: int) -> dict[str, Any]:
        return json.loads((out / CHUNKS / f"{k:06d}.json").read_text())

    if workers <= 1:
        for task in tasks:
            collect(committed(task[0]) if task[0] in done else run_chunk(task, tok, opts, out))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_worker_init, initargs=(opts, out)) as pool:
            window: deque = deque()  # at most `in_flight` chunks: bounded memory
            limit = opts.in_flight(workers)
            for task in tasks:
                if task[0] in done:
                    window.append((task[0], None))
                else:
                    window.append((task[0], pool.apply_async(_worker_run, (task,))))
                while len(window) > limit or (window and window[0][1] is None):
                    k, pending = window.popleft()
                    collect(committed(k) if pending is None else pending.get())
            while window:
                k, pending = window.popleft()
                collect(committed(k) if pending is None else pending.get())
    progress.add({"documents": 0, "input_bytes": 0, "bad_count": 0}, final=True)
    manifest = _manifest(opts, tok, [results[k] for k in sorted(results)], fingerprint)
    manifest["prepare_seconds"] = round(time.perf_counter() - start, 2)
    _write_json(out / MANIFEST, manifest)
    return manifest


def _manifest(
    opts: Options, tok: Tokenizers, chunks: list[dict[str, Any]], fingerprint: dict[str, Any]
) -> dict[str, Any]:
    splits = {}
    for split in ("train", "heldout"):
        shards = [s for c in chunks for s in c["splits"][split]["shards"]]
        counts = np.sum([c["splits"][split]["modality_tokens"] for c in chunks], axis=0)
        total = int(counts.sum())
        if not shards:
            raise ValueError(
                f"The {split} split is empty: {sum(c['documents'] for c in chunks)} documents "
                f"with --heldout-fraction {opts.heldout_fraction}. Add documents or change the "
                "fraction."
            )
        splits[split] = {
            "shards": [s["file"] for s in shards],
            "shard_records": [s["records"] for s in shards],
            "records": sum(s["records"] for s in shards),
            "tokens": total,
            "modality_tokens": dict(zip(MODALITY_NAMES, map(int, counts), strict=True)),
            "modality_shares": {
                m: float(c) / total for m, c in zip(MODALITY_NAMES, counts, strict=True)
            },
        }
    if tok.external:
        image_tok = {"name": "external", "n_codes": tok.external.n_codes, "decodable": False}
        image = {"grid": list(tok.external.grid), "codes_per_image": tok.codes_per_image}
    else:
        image_tok = {
            "name": ImageTokenizer.name if tok.image else "none",
            "version": ImageTokenizer.version,
            "n_codes": opts.image_codebook,
            "decodable": tok.image is not None,
            **({"file": TOKENIZER_FILE} if tok.image else {}),
        }
        grid = opts.image_size // opts.patch_size
        image = {
            "shape": [opts.image_size, opts.image_size],
            "channels": opts.image_channels,
            "patch_size": opts.patch_size,
            "codes_per_image": grid * grid,
        }
    bad = [b for c in chunks for b in c["bad"]][:LISTED_BAD]
    return {
        "format_version": records.FORMAT_VERSION,
        "name": "user-corpus",
        "seed": opts.seed,
        "heldout_fraction": opts.heldout_fraction,
        "vocab": tok.vocab.to_dict(),
        "text_tokenizer": tok.text.manifest(),
        "image_tokenizer": image_tok,
        "image": image,
        "splits": splits,
        "sources": {"inputs": list(opts.inputs), "files": fingerprint["files"]},
        "documents": sum(c["documents"] for c in chunks),
        "bad_records": {"count": sum(c["bad_count"] for c in chunks), "first": bad},
        "options": dataclasses.asdict(opts),
    }
