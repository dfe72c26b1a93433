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
import struct
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from moma_jax.data import inputs, records, text_tokenizers
from moma_jax.data.image_tokenizer import ImageTokenizer, image_to_patches
from moma_jax.data.images import ExternalCodes, load_image
from moma_jax.data.prepare import MANIFEST, TOKENIZER_FILE
from moma_jax.data.vocab import Vocab
from moma_jax.modality import MODALITY_NAMES

STATE = "prepare_state.json"
CHUNKS = "chunks"
LISTED_BAD = 20  # bad records listed in the manifest (all are counted)
# One record per chunk (random access reads one record), one writer thread, snappy: brotli (the
# default) keeps ~10 MB of window per writer, which broke the --max-memory bound.
WRITER_OPTIONS = "group_size:1,max_parallelism:1,snappy"


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything that decides the output (the worker count does not)."""

    inputs: tuple[str, ...]
    text_tokenizer: str = "bytes"
    image_codes: str | None = None  # "CODEBOOK:HxW": external codes instead of k-means
    image_codebook: int = 512
    image_size: int = 32
    image_channels: int = 3
    patch_size: int = 4
    heldout_fraction: float = 0.05
    seed: int = 0
    shard_bytes: int = 64 << 20
    max_doc_bytes: int = 4096
    max_memory: int = 512 << 20
    skip_bad: bool = False
    tokenizer_sample_bytes: int = 64 << 20
    codebook_images: int = 4096

    def check(self) -> None:
        if not self.inputs:
            raise ValueError("--input: give at least one JSONL file, image folder, CSV or text.")
        if self.image_channels not in (1, 3):
            raise ValueError(f"--image-channels {self.image_channels}: 1 (grey) or 3 (colour).")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"--image-size {self.image_size} is not a multiple of --patch-size "
                f"{self.patch_size}; use a multiple of it."
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"--heldout-fraction {self.heldout_fraction} must be in (0, 1).")
        if self.max_memory < 10**6:
            raise ValueError(f"--max-memory {self.max_memory} bytes: at least 1MB.")
        text_tokenizers.parse_choice(self.text_tokenizer)
        if self.image_codes:
            ExternalCodes.parse(self.image_codes)

    @property
    def external(self) -> ExternalCodes | None:
        return ExternalCodes.parse(self.image_codes) if self.image_codes else None

    @property
    def chunk_bytes(self) -> int:
        """Input bytes per chunk, from the options only (never the worker count, so the
        chunks and shards are the same for any number of workers): 1/32 of max_memory."""
        return max(16 << 10, min(self.shard_bytes, self.max_memory // 32))

    def in_flight(self, workers: int) -> int:
        """Chunks submitted at once: two per worker, within max_memory (a chunk in flight costs
        about 4x its input bytes: the records, then their tokens and serialised bytes)."""
        return max(1, min(2 * workers, self.max_memory // (4 * self.chunk_bytes)))


def held_out(seed: int, index: int, fraction: float) -> bool:
    """A seeded coin per document index (the same in every process and run)."""
    return zlib.crc32(struct.pack("<qq", seed, index)) < fraction * 2**32


def image_first(seed: int, index: int) -> bool:
    """For image+caption records: the image before its caption, or after (a seeded coin)."""
    return zlib.crc32(struct.pack("<qqq", seed, index, 1)) % 2 == 0


# --- Tokenizers ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Tokenizers:
    text: Any  # text_tokenizers.TextTokenizer
    image: ImageTokenizer | None  # the k-means codebook (None: external codes or no images)
    external: ExternalCodes | None
    vocab: Vocab

    @property
    def codes_per_image(self) -> int:
        if self.external:
            return self.external.codes_per_image
        return 0 if self.image is None else self.image.codes_per_image


def _sample(opts: Options, paths: list[Path], text: bool, images: bool) -> tuple[list, list]:
    """Seeded reservoir samples of text documents and image files, in one streaming pass."""
    rng = np.random.default_rng([opts.seed, zlib.crc32(b"tokenizer-sample")])
    budget = min(opts.tokenizer_sample_bytes, opts.max_memory // 4)
    n_texts = max(1, budget // opts.max_doc_bytes)
    pixels = opts.image_size**2 * opts.image_channels * 4
    n_images = max(1, min(opts.codebook_images, opts.max_memory // (4 * pixels)))
    texts: list[str] = []
    image_refs: list[tuple[Path, str, int]] = []
    seen = {"text": 0, "image": 0}
    for raw in inputs.scan(paths, opts.max_doc_bytes):
        try:
            items = inputs.parse(raw, external_codes=opts.external is not None)
        except inputs.BadRecordError:
            continue  # reported by the main pass
        for kind, value in items:
            if kind == "text" and text and value:
                value = value.encode()[: opts.max_doc_bytes].decode(errors="ignore")
                _reservoir(texts, value, seen, "text", n_texts, rng)
            elif kind == "image" and images:
                _reservoir(image_refs, (value, raw.source, raw.line), seen, "image", n_images, rng)
    return texts, image_refs


def _reservoir(sample: list, item: Any, seen: dict, kind: str, cap: int, rng) -> None:
    """Algorithm R: after n items each is in `sample` with probability cap / n."""
    seen[kind] += 1
    if len(sample) < cap:
        sample.append(item)
    else:
        slot = int(rng.integers(seen[kind]))
        if slot < cap:
            sample[slot] = item


def make_tokenizers(opts: Options, paths: list[Path], out: Path, log: Callable) -> Tokenizers:
    """Train (or copy) the tokenizers into `out`, before any shard is written."""
    kind, arg = text_tokenizers.parse_choice(opts.text_tokenizer)
    external = opts.external
    need_codebook = external is None
    texts, image_refs = (
        _sample(opts, paths, text=kind == "bpe", images=need_codebook)
        if kind == "bpe" or need_codebook
        else ([], [])
    )
    text: Any
    if kind == "bytes":
        text = text_tokenizers.Bytes()
    elif kind == "bpe":
        log(f"training a byte-level BPE of {arg} ids on {len(texts)} sampled documents")
        text = text_tokenizers.train_bpe(texts, arg, out / text_tokenizers.TOKENIZER_JSON)
    else:
        text = text_tokenizers.from_file(arg, out)
    image = None
    arrays = []
    if need_codebook and image_refs:
        log(f"fitting the {opts.image_codebook}-code image codebook on {len(image_refs)} images")
        for path, source, line in image_refs:
            try:
                arrays.append(load_image(path, opts.image_size, opts.image_channels, source, line))
            except inputs.BadRecordError:
                continue  # reported by the main pass
    if arrays:
        patches = image_to_patches(np.stack(arrays), opts.patch_size)
        image = ImageTokenizer.fit(
            patches.reshape(-1, patches.shape[-1]),
            n_codes=opts.image_codebook,
            patch_size=opts.patch_size,
            image_size=opts.image_size,
            channels=opts.image_channels,
            seed=opts.seed,
        )
        image.save(out / TOKENIZER_FILE)
    n_codes = external.n_codes if external else opts.image_codebook
    vocab = Vocab(n_text=text.n_text, n_image_codes=n_codes)
    return Tokenizers(text, image, external, vocab)


def load_tokenizers(opts: Options, out: Path) -> Tokenizers:
    """The tokenizers `make_tokenizers` wrote (in a worker, or on resume)."""
    entry = json.loads((out / "tokenizers.json").read_text())
    text = text_tokenizers.load(entry["text"], out)
    image = ImageTokenizer.load(out / TOKENIZER_FILE) if (out / TOKENIZER_FILE).is_file() else None
    external = opts.external
    n_codes = external.n_codes if external else opts.image_codebook
    return Tokenizers(text, image, external, Vocab(n_text=text.n_text, n_image_codes=n_codes))


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
